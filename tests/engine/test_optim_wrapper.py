"""The non-finite guard: skips, counts, clip_grad, AMP overflow accounting, scheduler order and warmup."""
import warnings

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper

from projects.vim_disc.engine import optim_wrapper as ow
from projects.vim_disc.engine.optim_wrapper import (AMP_OVERFLOW_STEPS, AMP_OVERFLOWS_TOTAL, SKIPPED_STEPS,
                                                    SKIPS_TOTAL, GuardedAmpOptimWrapper, GuardedOptimWrapper)
from tests.engine.toy_runner import toy_runner, weights


class _Trace(Hook):
    """Weights, optimizer momentum and lr around every iteration."""

    def __init__(self):
        self.lr, self.before, self.after, self.momentum = [], [], [], []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.lr.append(runner.optim_wrapper.optimizer.param_groups[0]['lr'])
        self.before.append(weights(runner))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.after.append(weights(runner))
        state = runner.optim_wrapper.optimizer.state
        self.momentum.append({name: state[p]['momentum_buffer'].clone()
                              for name, p in runner.model.named_parameters() if p in state})


def _guarded(**kwargs):
    return dict(type=GuardedOptimWrapper, optimizer=dict(type='SGD', lr=0.1, momentum=0.9), **kwargs)


def _run(tmp_path, optim_wrapper, max_iters=6, **kwargs):
    trace = _Trace()
    runner = toy_runner(tmp_path, max_iters=max_iters, ckpt_interval=100, optim_wrapper=optim_wrapper,
                        custom_hooks=[trace], **kwargs)
    runner.train()
    return runner, trace


def _scheduler_order_warnings(caught):
    return [w for w in caught if 'before' in str(w.message) and 'optimizer.step()' in str(w.message)]


def test_first_iteration_trains_at_warmup_start_lr_without_scheduler_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        runner, trace = _run(tmp_path, _guarded())
    assert not _scheduler_order_warnings(caught)
    # LinearLR(start_factor=0.1, end=3) on lr 0.1 reaches 1.0x at its last step (2); MultiStepLR halves at 5
    assert trace.lr == pytest.approx([0.01, 0.055, 0.1, 0.1, 0.1, 0.05])
    # and the first update really used 0.01: SGD's first step is w -= lr * grad (momentum buffer = grad)
    w0, w1 = trace.before[0]['lin.weight'], trace.after[0]['lin.weight']
    torch.testing.assert_close(w0 - w1, 0.01 * trace.momentum[0]['lin.weight'])


def test_guard_changes_nothing_when_all_is_finite(tmp_path):
    clip = dict(max_norm=0.05, norm_type=2)  # small: clipping is active every step
    stock, _ = _run(tmp_path / 'stock', dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1, momentum=0.9),
                                             clip_grad=dict(clip)))
    guarded, _ = _run(tmp_path / 'guarded', _guarded(clip_grad=dict(clip)))
    for k, v in weights(stock).items():
        torch.testing.assert_close(weights(guarded)[k], v, rtol=1e-6, atol=1e-7)
    assert guarded.message_hub.get_info(SKIPS_TOTAL) is None
    assert guarded.message_hub.get_scalar(SKIPPED_STEPS).data[0].tolist() == [0] * 6
    stock_norms = stock.message_hub.get_scalar('train/grad_norm').data[0]
    guarded_norms = guarded.message_hub.get_scalar('train/grad_norm').data[0]
    assert guarded_norms == pytest.approx(stock_norms, rel=1e-6)


@pytest.mark.parametrize('where', ['loss', 'grad'])
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, where):
    bad = [0, 2, 3]  # 0: the very first step, which the scheduler-order check looks at
    inject = dict(loss_iters=bad) if where == 'loss' else dict(grad_iters=bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        runner, trace = _run(tmp_path, _guarded(clip_grad=dict(max_norm=1.0), inject_nonfinite=inject))
    assert not _scheduler_order_warnings(caught)
    for i in range(6):
        changed = any(not torch.equal(trace.before[i][k], trace.after[i][k]) for k in trace.before[i])
        assert changed == (i not in bad), f'iteration {i}'
        assert all(torch.isfinite(v).all() for v in trace.after[i].values())
    # momentum is untouched by a skipped step (the optimizer never ran)
    for i in (2, 3):
        for key, buf in trace.momentum[i].items():
            torch.testing.assert_close(buf, trace.momentum[1][key], rtol=0, atol=0)
    assert runner.message_hub.get_info(SKIPS_TOTAL) == 3
    assert runner.optim_wrapper.consecutive_skips == 0  # iterations 4 and 5 updated
    assert runner.optim_wrapper.last_skip['iter'] == 3
    # the running total after every update, so the value the logger reads at any iteration is exact
    assert runner.message_hub.get_scalar(SKIPPED_STEPS).data[0].tolist() == [1, 1, 2, 3, 3, 3]
    # the scheduler kept its schedule through the skips
    assert trace.lr == pytest.approx([0.01, 0.055, 0.1, 0.1, 0.1, 0.05])


def test_skip_log_names_the_iteration(tmp_path):
    runner, _ = _run(tmp_path, _guarded(inject_nonfinite=dict(loss_iters=[4])), max_iters=5)
    log_files = list(tmp_path.rglob('*.log'))
    text = ''.join(p.read_text() for p in log_files)
    assert 'iter 5: non-finite loss on rank(s) [0]' in text
    assert '1 in a row, 1 in total' in text


def test_gradient_accumulation_remembers_a_bad_micro_batch():
    MessageHub.get_instance('accum').update_info('iter', 0)
    model = nn.Linear(2, 1)
    wrapper = GuardedOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    before = model.weight.detach().clone()
    x = torch.ones(1, 2)
    wrapper.update_params(model(x).sum() * float('nan'))  # micro-batch 1: bad
    wrapper.update_params(model(x).sum())  # micro-batch 2: fine, but the sum of both is not
    assert torch.equal(model.weight, before) and wrapper.consecutive_skips == 1
    assert model.weight.grad is None or not model.weight.grad.any()  # zeroed for the next update


# -- AMP -----------------------------------------------------------------------------------------------
@pytest.fixture
def cpu_amp(monkeypatch, request):
    """Let mmengine's AMP wrapper run on CPU: a real GradScaler on the CPU device."""
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_module
    monkeypatch.setattr(amp_module, 'is_cuda_available', lambda: True)
    monkeypatch.setattr(amp_module, 'GradScaler', lambda **kw: torch.amp.GradScaler('cpu', **kw))
    MessageHub.get_instance(f'amp-{request.node.name}').update_info('iter', 0)  # a fresh hub per test


def _amp_wrapper(model, **kwargs):
    return GuardedAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  loss_scale=dict(init_scale=2.0 ** 4, growth_interval=1000), **kwargs)


def test_amp_overflow_is_counted_apart_and_backs_off(cpu_amp):
    model = nn.Linear(2, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    wrapper = _amp_wrapper(model, min_loss_scale=1.0)
    hub = wrapper.message_hub
    x = torch.full((1, 2), 1e3)
    # loss 0 (finite), d loss / d w = 1e36 * x = 1e39: overflows float32 at any scale >= 1/2
    overflowing = lambda: model(x).sum() * 1e36  # noqa: E731
    for expected_scale in (8.0, 4.0, 2.0, 1.0):
        wrapper.update_params(overflowing())
        assert wrapper.loss_scaler.get_scale() == expected_scale
        assert wrapper.consecutive_skips == 0  # GradScaler's business, not the guard's
    assert hub.get_info(AMP_OVERFLOWS_TOTAL) == 4 and hub.get_info(SKIPS_TOTAL) is None
    assert not model.weight.any()
    # below min_loss_scale the overflow is a real blow-up: it also counts towards rollback
    wrapper.update_params(overflowing())
    assert wrapper.loss_scaler.get_scale() == 0.5
    assert wrapper.consecutive_skips == 1 and hub.get_info(SKIPS_TOTAL) == 1
    assert hub.get_info(AMP_OVERFLOWS_TOTAL) == 5
    # a good step updates and clears the streak
    wrapper.update_params(model(torch.ones(1, 2)).sum())
    assert model.weight.any() and wrapper.consecutive_skips == 0
    # both running totals and the scale, published after each of the six updates
    assert hub.get_scalar(AMP_OVERFLOW_STEPS).data[0].tolist() == [1, 2, 3, 4, 5, 5]
    assert hub.get_scalar(SKIPPED_STEPS).data[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert hub.get_scalar('train/loss_scale').data[0].tolist() == [8, 4, 2, 1, 0.5, 0.5]


def test_amp_nonfinite_loss_is_a_guard_skip_and_keeps_the_scale(cpu_amp):
    model = nn.Linear(2, 1)
    wrapper = _amp_wrapper(model, inject_nonfinite=dict(loss_iters=[0]))
    before = model.weight.detach().clone()
    wrapper.update_params(model(torch.ones(1, 2)).sum())
    assert wrapper.loss_scaler.get_scale() == 16.0
    assert wrapper.consecutive_skips == 1 and wrapper.message_hub.get_info(AMP_OVERFLOWS_TOTAL) is None
    assert wrapper.message_hub.get_scalar(SKIPPED_STEPS).current() == 1
    assert wrapper.message_hub.get_scalar(AMP_OVERFLOW_STEPS).current() == 0
    assert torch.equal(model.weight, before)


def test_amp_clip_uses_unscaled_gradients(cpu_amp):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    ref = nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    wrapper = _amp_wrapper(model, clip_grad=dict(max_norm=0.1))
    x = torch.randn(3, 4)
    wrapper.update_params(model(x).pow(2).sum())
    ref_wrapper = OptimWrapper(optimizer=torch.optim.SGD(ref.parameters(), lr=0.1), clip_grad=dict(max_norm=0.1))
    ref_wrapper.update_params(ref(x).pow(2).sum())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_injection_targets_only_the_named_ranks(monkeypatch):
    inj = ow._Injection(loss_iters=[3], ranks=[1])
    monkeypatch.setattr(ow, 'get_dist_info', lambda: (0, 2))
    assert not inj.hits(inj.loss_iters, 3)
    monkeypatch.setattr(ow, 'get_dist_info', lambda: (1, 2))
    assert inj.hits(inj.loss_iters, 3) and not inj.hits(inj.loss_iters, 4)


def test_registered_for_configs():
    from mmdet.registry import OPTIM_WRAPPERS
    assert OPTIM_WRAPPERS.get('GuardedOptimWrapper') is GuardedOptimWrapper
    assert OPTIM_WRAPPERS.get('GuardedAmpOptimWrapper') is GuardedAmpOptimWrapper

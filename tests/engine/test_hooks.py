"""SSM statistics and the non-finite rollback, on real Runners with toy models."""
import json
import math

import numpy as np
import pytest
import torch
from mmengine.hooks import Hook

from kernels.discretization import get_discretizer
from projects.vim_disc.engine.hooks import (LR_SCALE, ROLLBACKS, NonFiniteRollbackHook, NonFiniteTrainingError,
                                            SSMStatsHook, summarize_direction)
from projects.vim_disc.engine.optim_wrapper import SKIPS_TOTAL, GuardedOptimWrapper
from tests.engine.toy_runner import ToySSMModel, toy_runner, weights
from tests.kernels.user_rules import ForwardEuler


def _brute_force(delta, A, disc):
    z = (delta[..., None] * A[None, :, None, :]).double()
    zk = disc.clamp_z(z) if disc.z_clamp is not None else z
    n = delta.numel()
    p99 = np.percentile(delta.double().flatten().numpy(), 99, method='inverted_cdf')  # nearest rank
    beyond = (z < disc.z_stable).double().mean() if disc.z_stable is not None else torch.tensor(0.)
    return dict(delta_mean=delta.double().mean(), delta_p99=p99, delta_max=delta.max(), z_min=z.min(),
                abar_max=disc.abar(zk).abs().max(), z_beyond=beyond), n


@pytest.mark.parametrize('rule', ['zoh', 'bilinear', 'rk4', 'euler'])
@pytest.mark.parametrize('max_elements', [1 << 22, 37])  # 37: many channel blocks
def test_summary_matches_brute_force(rule, max_elements):
    g = torch.Generator().manual_seed(0)
    disc = ForwardEuler() if rule == 'euler' else get_discretizer(rule)
    delta = torch.rand(3, 7, 11, generator=g) * 2.5  # z down to about -2.5 * 5: beyond rk4's bound too
    A = -torch.rand(7, 5, generator=g) * 5
    got = summarize_direction(delta, A, disc, max_elements=max_elements)
    want, _ = _brute_force(delta, A, disc)
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-6), k
    if rule == 'rk4':  # clamped at its bound: |Abar| stays <= 1 although z went beyond it
        assert float(got['z_beyond']) > 0 and float(got['abar_max']) <= 1 + 1e-6


class _GradProbe(Hook):
    """The SSM gradient norms just before each optimizer step (the reference for the hook's)."""

    def __init__(self):
        self.norms = {}

    def before_train(self, runner):
        model = runner.model
        runner.optim_wrapper.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.norms.__setitem__(runner.iter, {
                (i, d, grp): math.sqrt(sum(float(p.grad.pow(2).sum()) for p in
                                           _group_params(layer.mixer, d, grp)))
                for i, layer in enumerate(model.backbone.layers) for d in ('fwd', 'bwd')
                for grp in ('A_log', 'D', 'dt_proj', 'x_proj')}))


def _group_params(mixer, direction, group):
    attr = {'fwd': dict(A_log='A_log', D='D', dt_proj='dt_proj', x_proj='x_proj'),
            'bwd': dict(A_log='A_b_log', D='D_b', dt_proj='dt_proj_b', x_proj='x_proj_b')}[direction][group]
    owner = getattr(mixer, attr)
    return [owner] if isinstance(owner, torch.nn.Parameter) else list(owner.parameters())


class _RecordFlags(Hook):
    priority = 'LOWEST'

    def __init__(self):
        self.leftover = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.leftover.append([layer.mixer.ssm_stats is not None for layer in runner.model.backbone.layers])


def test_ssm_stats_hook_on_a_runner(tmp_path):
    probe, flags = _GradProbe(), _RecordFlags()
    stats_hook = SSMStatsHook(interval=2)
    runner = toy_runner(tmp_path, max_iters=5, ckpt_interval=100, model=ToySSMModel(get_discretizer('rk4')),
                        custom_hooks=[stats_hook, probe, flags], dropout=0.0)
    runner.train()
    hub = runner.message_hub
    for layer in ('layers.0', 'layers.1'):
        for d in ('fwd', 'bwd'):
            for stat in ('delta_mean', 'delta_p99', 'delta_max', 'z_min', 'abar_max', 'z_beyond',
                         'grad_A_log', 'grad_D', 'grad_dt_proj', 'grad_x_proj'):
                history = hub.get_scalar(f'ssm/{layer}/{d}/{stat}').data[0]
                assert len(history) == 2, (layer, d, stat)  # iterations 2 and 4
    # gradient norms are those the optimizer stepped with, at the statistics iterations (runner.iter 1, 3)
    for it, k in ((1, 0), (3, 1)):
        for (i, d, grp), norm in probe.norms[it].items():
            got = hub.get_scalar(f'ssm/layers.{i}/{d}/grad_{grp}').data[0][k]
            assert got == pytest.approx(norm, rel=1e-5), (it, i, d, grp)
    assert stats_hook.last_iter == 4
    # delta is dropped as soon as a layer is summarised; nothing is recorded between intervals
    assert not any(any(f) for f in flags.leftover)
    # visible in the text log (table + extremes in the iteration line) and in scalars.json (TensorBoard's feed)
    text = ''.join(p.read_text() for p in tmp_path.rglob('*.log'))
    assert 'SSM statistics at iter 2 (rule rk4' in text and 'ssm_abar_max' in text
    scalars = [json.loads(line) for p in tmp_path.rglob('scalars.json') for line in p.read_text().splitlines()]
    assert any('ssm/layers.1/bwd/z_beyond' in s for s in scalars)


def test_out_of_range_names_the_layer(tmp_path):
    model = ToySSMModel(ForwardEuler())
    model.backbone.layers[0].mixer.delta_scale = 0.1  # z ~ -0.2: fine
    model.backbone.layers[1].mixer.delta_scale = 50.0  # z ~ -100: |1 + z| ~ 99
    hook = SSMStatsHook(interval=1)
    toy_runner(tmp_path, max_iters=1, ckpt_interval=100, model=model, custom_hooks=[hook]).train()
    bad = hook.out_of_range()
    assert bad and all(b.startswith('layers.1 ') for b in bad)
    assert any('max|Abar|' in b and 'beyond z_stable' in b for b in bad)


def test_ssm_stats_on_the_vim_backbone(tmp_path):
    """The real mixer: its record_stats / ssm_stats contract as the hook uses it."""
    from mmengine.model import BaseModel

    from projects.vim_disc.models.vim import VimBackbone

    class TinyVim(BaseModel):
        def __init__(self):
            super().__init__()
            self.backbone = VimBackbone(arch=dict(embed_dims=16, depth=2), img_size=32, patch_size=16,
                                        discretization='rk4')

        def forward(self, x, y, mode='loss'):
            img = x.view(x.shape[0], 3, 1, 1).expand(-1, 3, 32, 32)
            return dict(loss=self.backbone(img)[0].pow(2).mean())

    hook = SSMStatsHook(interval=1)
    runner = toy_runner(tmp_path, max_iters=1, ckpt_interval=100, model=TinyVim(), custom_hooks=[hook])
    runner.train()
    assert set(hook.latest) == {'layers.0', 'layers.1'}
    row = hook.latest['layers.1']['bwd']
    assert 0 < row['delta_mean'] <= row['delta_p99'] <= row['delta_max']
    assert row['z_min'] < 0 and 0 < row['abar_max'] <= 1
    assert all(row[f'grad_{g}'] > 0 for g in ('A_log', 'D', 'dt_proj', 'x_proj'))


# -- rollback -------------------------------------------------------------------------------------
class _LrTrace(Hook):
    def __init__(self):
        self.lr, self.iters, self.weights = [], [], []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.lr.append(runner.optim_wrapper.optimizer.param_groups[0]['lr'])
        self.iters.append(runner.iter)
        self.weights.append(weights(runner))


def _guarded(inject):
    return dict(type=GuardedOptimWrapper, optimizer=dict(type='SGD', lr=0.1, momentum=0.9), inject_nonfinite=inject)


def test_rollback_after_k_skips_then_training_finishes(tmp_path):
    trace = _LrTrace()
    runner = toy_runner(tmp_path, max_iters=10, ckpt_interval=2,
                        optim_wrapper=_guarded(dict(loss_iters=[5, 6, 7], once=True)),
                        custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=3, lr_factor=0.5,
                                                            max_rollbacks=1), trace])
    runner.train()
    # 0..7, back to the checkpoint of iteration 4 (iter_6.pth was written during the streak: not "good")
    assert trace.iters == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9]
    ckpt = torch.load(tmp_path / 'iter_4.pth', weights_only=True)['state_dict']
    for k, v in ckpt.items():
        torch.testing.assert_close(trace.weights[8][k], v, rtol=0, atol=0)
    # the schedule (0.1 warm-up, halved at 5) continues from the checkpoint, at half the learning rate
    assert trace.lr == pytest.approx([0.01, 0.055, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05,
                                      0.05, 0.025, 0.025, 0.025, 0.025, 0.025])
    hub = runner.message_hub
    assert hub.get_info(ROLLBACKS) == 1 and hub.get_info(LR_SCALE) == 0.5 and hub.get_info(SKIPS_TOTAL) == 3
    assert runner.iter == 10 and all(torch.isfinite(v).all() for v in weights(runner).values())
    text = ''.join(p.read_text() for p in tmp_path.rglob('*.log'))
    assert 'rollback 1/1: 3 consecutive non-finite updates ending at iter 8' in text


def test_error_after_m_rollbacks_names_iteration_losses_and_layers(tmp_path):
    model = ToySSMModel(ForwardEuler(), nan_iters=[5, 6, 7])  # a NaN loss from the model: log_vars see it
    model.backbone.layers[0].mixer.delta_scale = 0.1
    model.backbone.layers[1].mixer.delta_scale = 50.0
    runner = toy_runner(tmp_path, max_iters=12, ckpt_interval=2, model=model, optim_wrapper=_guarded(None),
                        custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=3, max_rollbacks=1),
                                      SSMStatsHook(interval=100)])
    with pytest.raises(NonFiniteTrainingError) as err:
        runner.train()
    msg = str(err.value)
    assert 'training diverged at iter 8' in msg and 'after 1 rollback(s)' in msg
    assert 'loss_fit=nan (!)' in msg
    assert 'SSM layers out of range: layers.1 fwd: max|Abar|' in msg and 'layers.1 bwd' in msg
    assert 'layers.0' not in msg
    assert 'SSM gradient norms non-finite in every layer' in msg


def test_a_streak_and_the_good_checkpoint_survive_a_resume(tmp_path):
    first = toy_runner(tmp_path, max_iters=6, ckpt_interval=2, optim_wrapper=_guarded(dict(loss_iters=[4, 5])),
                       custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=3)])
    first.train()  # iter_6.pth is written two skips into a streak
    trace = _LrTrace()
    resumed = toy_runner(tmp_path, max_iters=8, ckpt_interval=2, resume=True,
                         optim_wrapper=_guarded(dict(loss_iters=[6], once=True)),
                         custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=3), trace])
    resumed.train()
    # the third skip in a row (the first after the restart) rolls back to iter_4, the last good checkpoint
    assert trace.iters == [6, 4, 5, 6, 7]
    assert resumed.message_hub.get_info(ROLLBACKS) == 1


def test_no_good_checkpoint_is_an_error(tmp_path):
    runner = toy_runner(tmp_path, max_iters=6, ckpt_interval=100, optim_wrapper=_guarded(dict(loss_iters=[0, 1])),
                        custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=2)])
    with pytest.raises(NonFiniteTrainingError, match='no good checkpoint'):
        runner.train()


def test_rollback_needs_the_guarded_wrapper(tmp_path):
    runner = toy_runner(tmp_path, max_iters=2, custom_hooks=[NonFiniteRollbackHook()])
    with pytest.raises(TypeError, match='GuardedOptimWrapper'):
        runner.train()


def test_registered_for_configs():
    from mmdet.registry import HOOKS
    for name in ('NonFiniteRollbackHook', 'SSMStatsHook', 'PreemptionHook', 'RNGStateHook'):
        assert HOOKS.get(name) is not None, name

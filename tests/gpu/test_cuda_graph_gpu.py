"""The Vim backbone's CUDA-graph capture on the card (models/cuda_graph.py): replays against an eager twin with
the same weights (outputs, every parameter gradient, gradient accumulation, DropPath's random stream, the
SSM-statistics fallback), and a short mmengine training run of the demo detector with capture on, resumed
from its checkpoint. Skipped without CUDA; the control flow is tested on CPU in tests/models/test_cuda_graph.py.
"""
import copy
import os.path as osp

import pytest
import torch

from projects.vim_disc.models import VimBackbone
from projects.vim_disc.models.cuda_graph import cuda_graph_state

pytestmark = pytest.mark.gpu

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DIMS = 96
SIZE = (112, 144)  # a 7 x 9 grid (63 tokens, not a power of two), the position embedding interpolated from 8 x 8


def pair(**kwargs):
    """A backbone that captures after one warm-up call, and an eager twin with the same weights."""
    torch.manual_seed(0)
    graphed = VimBackbone(arch=dict(embed_dims=DIMS, depth=4), img_size=128, cuda_graph=True, cuda_graph_warmup=1,
                          **kwargs)
    graphed = graphed.cuda().train()
    eager = copy.deepcopy(graphed)
    eager.cuda_graph = False
    return graphed, eager


def fwd_bwd(model, x, dout, amp):
    # torch.autocast with its weight cache on, as mmengine's AMP wrapper enters it: the capture nests its own
    # cache-free context inside
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        out = model(x)[0]
    out.backward(dout)
    return out


def batch():
    x = torch.randn(2, 3, *SIZE, device='cuda')
    dout = torch.randn(2, DIMS, SIZE[0] // 16, SIZE[1] // 16, device='cuda')
    return x, dout


def assert_close_to(got, want, tol, what):
    """Max error relative to the reference's largest magnitude (the two paths differ only by atomics' order)."""
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= tol * scale, f'{what}: max error {err:.3g}, reference max {scale:.3g}'


def assert_same_grads(graphed, eager, tol):
    for (name, p), (_, q) in zip(graphed.named_parameters(), eager.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert_close_to(p.grad, q.grad, tol, f'grad of {name}')


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16'])
def test_replays_match_eager_outputs_and_every_gradient(amp):
    graphed, eager = pair()
    state = cuda_graph_state(graphed)
    tol = 3e-2 if amp else 1e-4
    previous = None
    for step in range(5):  # 1 warm-up, the capture, 3 replays; new images and output gradients each time
        x, dout = batch()
        out = fwd_bwd(graphed, x, dout, amp)
        want = fwd_bwd(eager, x, dout, amp)
        assert out.dtype == want.dtype == torch.float32
        assert_close_to(out, want, tol, f'output of step {step}')
        assert_same_grads(graphed, eager, tol)
        if previous is not None and step >= 2:  # documented: a replay's output is the graph's static buffer
            assert previous.data_ptr() == out.data_ptr()
        previous = out
        for m in (graphed, eager):
            m.zero_grad(set_to_none=True)
    assert state.captures == 1 and state.replays == 4 and state.eager_calls == 1

    # micro-batches: two backwards summed in .grad, then zero_grad(set_to_none=False) and one more
    for m in (graphed, eager):
        m.zero_grad(set_to_none=False)
    for _ in range(2):
        x, dout = batch()
        for m in (graphed, eager):
            fwd_bwd(m, x, dout, amp)
    assert_same_grads(graphed, eager, tol)
    for m in (graphed, eager):
        m.zero_grad(set_to_none=False)
    x, dout = batch()
    for m in (graphed, eager):
        fwd_bwd(m, x, dout, amp)
    assert_same_grads(graphed, eager, tol)
    assert state.captures == 1 and state.replays == 7


def test_drop_path_draws_fresh_masks_each_replay_the_same_as_eager():
    graphed, eager = pair(drop_path_rate=0.3)
    x, dout = batch()
    x = torch.cat([x, x])  # 4 images: 4 masks per DropPath
    dout = torch.cat([dout, dout])
    for _ in range(2):  # warm-up, capture
        fwd_bwd(graphed, x, dout, False)
    assert cuda_graph_state(graphed).captures == 1

    torch.cuda.manual_seed(7)
    first = fwd_bwd(graphed, x, dout, False).detach().clone()
    rng_after_replay = torch.cuda.get_rng_state()
    second = fwd_bwd(graphed, x, dout, False).detach().clone()
    assert not torch.allclose(first, second), 'two replays of one input drew the same DropPath masks'

    torch.cuda.manual_seed(7)  # eager from the same generator state: the same masks, and the same advance
    want = fwd_bwd(eager, x, dout, False)
    assert torch.equal(torch.cuda.get_rng_state(), rng_after_replay)
    assert_close_to(first, want, 1e-4, 'replay vs eager with the same RNG state')

    graphed.eval(), eager.eval()
    with torch.no_grad():
        assert_close_to(graphed(x)[0], eager(x)[0], 1e-4, 'eval (no DropPath)')
    assert cuda_graph_state(graphed).replays == 3  # the capture's own call, first, second


def test_a_statistics_iteration_runs_eagerly_and_records():
    graphed, eager = pair()
    state = cuda_graph_state(graphed)
    for _ in range(2):
        fwd_bwd(graphed, *batch(), False)
    assert state.replays == 1
    for m in graphed.mixers:
        m.record_stats = True
    x, dout = batch()
    out = fwd_bwd(graphed, x, dout, False)
    assert state.replays == 1 and state.eager_calls == 2
    for m in graphed.mixers:
        assert m.ssm_stats is not None and set(m.ssm_stats) == {'fwd', 'bwd'}
        assert m.ssm_stats['fwd']['delta'].shape == (2, 2 * DIMS, 63)
        m.record_stats, m.ssm_stats = False, None
    assert_close_to(out, fwd_bwd(eager, x, dout, False), 1e-4, 'statistics iteration')
    fwd_bwd(graphed, *batch(), False)
    assert state.replays == 2  # back to the graph


# -- a short training run of the demo detector ------------------------------------------------------
@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('shapes'))


def demo_runner(work_dir, data_root, name, resume_from=None):
    from mmengine.config import Config

    from projects.vim_disc.engine import install_safe_checkpoint_loading
    from projects.vim_disc.utils import build_runner
    install_safe_checkpoint_loading()
    cfg = Config.fromfile(osp.join(ROOT, 'configs/demo/vim_demo.py'))
    cfg.merge_from_dict({
        'model.backbone.arch.depth': 2,
        'model.backbone.cuda_graph': True,
        'model.backbone.cuda_graph_warmup': 1,
        'train_dataloader.batch_size': 2,
        'train_dataloader.num_workers': 0,
        'train_dataloader.persistent_workers': False,
        'train_dataloader.dataset.data_root': data_root,
        'train_dataloader.dataset.num_train': 16,
        'train_dataloader.dataset.num_val': 2,
        'train_cfg.max_iters': 6,
        'train_cfg.val_interval': 6,
        'default_hooks.checkpoint.interval': 3,
        'default_hooks.logger.interval': 1,
    })
    # every batch one size (the demo resizes keeping the aspect ratio): what the COCO recipe's LSJ crops give
    cfg.model.data_preprocessor.batch_augments = [dict(type='BatchFixedSizePad', size=(160, 160), pad_mask=True)]
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    # SSM statistics at iterations 3 and 6 (eager); the other default hooks (RNG state, preemption, rollback) stay
    cfg.custom_hooks = [dict(h, interval=3) if h['type'] == 'SSMStatsHook' else h for h in cfg.custom_hooks]
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    cfg.visualizer.name = f'{name}_visualizer'  # not the first run's instance
    cfg.work_dir, cfg.launcher, cfg.experiment_name = str(work_dir), 'none', name
    if resume_from is not None:
        cfg.resume, cfg.load_from = True, resume_from
    return build_runner(cfg)


def train(work_dir, data_root, name, resume_from=None):
    from mmengine.hooks import Hook

    from projects.vim_disc.engine.hooks import SSMStatsHook, uninstall_preemption_signal_handlers

    class Losses(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.losses = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.losses.append(float(outputs['loss'].detach()))

    runner = demo_runner(work_dir, data_root, name, resume_from)
    recorder = Losses()
    runner.register_hook(recorder, 'LOWEST')
    try:
        runner.train()
    finally:
        uninstall_preemption_signal_handlers()
    stats = next(h for h in runner.hooks if isinstance(h, SSMStatsHook))
    return runner, recorder.losses, stats


def train_and_resume(tmp_path, data_root):
    """Six iterations with capture on, then iterations 4-6 again resumed from iter_3.pth: the checks both
    the card (real graphs) and tests/models/test_cuda_graph.py (a fake maker on CPU) make."""
    from projects.vim_disc.engine import load_checkpoint_safely
    from projects.vim_disc.engine.optim_wrapper import SKIPS_TOTAL

    full, losses, stats = train(tmp_path / 'full', data_root, 'cuda_graph_full')
    state = cuda_graph_state(full.model.backbone)
    # iter 1 warms up, 2 captures, 3 and 6 record SSM statistics (eager), 4 and 5 replay
    assert state.captures == 1 and state.replays == 3 and state.eager_calls == 3 and state.disabled is None
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert stats.last_iter == 6 and set(stats.latest) == {'layers.0', 'layers.1'}
    assert full.message_hub.get_info(SKIPS_TOTAL, 0) == 0 and full.optim_wrapper.consecutive_skips == 0

    ckpt = str(tmp_path / 'full' / 'iter_3.pth')
    resumed, losses_resumed, _ = train(tmp_path / 'resumed', data_root, 'cuda_graph_resumed', resume_from=ckpt)
    # resumed: iter 4 warms up, 5 captures, 6 records statistics: eager and replayed steps interleave differently
    assert cuda_graph_state(resumed.model.backbone).captures == 1 and len(losses_resumed) == 3

    start = load_checkpoint_safely(ckpt, map_location='cpu')['state_dict']
    end, other = full.model.state_dict(), resumed.model.state_dict()
    moved = sum((end[k].float().cpu() - start[k].float()).square().sum() for k in end).sqrt()
    apart = sum((end[k].float() - other[k].float()).square().sum() for k in end).sqrt().cpu()
    # float noise (atomics in RoIAlign's and the scan's backward) only: a stale replay, a lost gradient or a
    # random stream shifted by the capture moves the weights apart by a sizeable part of the 3 steps' change
    assert moved > 0 and apart <= 1e-2 * moved, f'resumed {apart:.3g} from the full run; 3 steps moved {moved:.3g}'
    for a, b in zip(losses[3:], losses_resumed):
        assert abs(a - b) <= 1e-3 * abs(a), (losses[3:], losses_resumed)
    return full


def test_demo_training_with_capture_finishes_and_resumes_to_the_same_weights(tmp_path, shapes_root):
    full = train_and_resume(tmp_path, shapes_root)
    backbone = full.model.backbone
    assert next(backbone.parameters()).is_cuda and backbone.cuda_graph

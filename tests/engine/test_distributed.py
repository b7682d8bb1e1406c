"""Two gloo processes (DDP on CPU) where only rank 1 sees the trouble: every decision is taken jointly.

One pair of processes runs all scenarios in turn (start-up dominates); a hang shows as a join timeout.
"""
import os
import os.path as osp
import signal

import pytest
import torch
import torch.multiprocessing as mp
from mmengine.hooks import Hook

from tests.ports import free_port

SCENARIOS = ('grad_skip', 'rollback', 'diverge', 'preempt')


class _SignalRank1(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == 2 and runner.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def _scenario(name, work_dir):
    from projects.vim_disc.engine.hooks import NonFiniteRollbackHook, PreemptionHook, RNGStateHook
    from projects.vim_disc.engine.optim_wrapper import GuardedOptimWrapper
    from tests.engine.toy_runner import toy_runner

    def guarded(**inject):
        return dict(type=GuardedOptimWrapper, optimizer=dict(type='SGD', lr=0.1, momentum=0.9),
                    inject_nonfinite=dict(ranks=[1], **inject))

    common = dict(launcher='pytorch', dropout=0.0,
                  cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel', device_ids=None)))  # CPU DDP
    if name == 'grad_skip':  # inf in rank 1's gradient AFTER the DDP all-reduce: rank 0 cannot see it
        return toy_runner(work_dir, max_iters=6, ckpt_interval=100, optim_wrapper=guarded(grad_iters=[2, 3]),
                          **common)
    if name == 'rollback':
        return toy_runner(work_dir, max_iters=10, ckpt_interval=2,
                          optim_wrapper=guarded(loss_iters=[5, 6, 7], once=True),
                          custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=3, max_rollbacks=1)], **common)
    if name == 'diverge':
        return toy_runner(work_dir, max_iters=12, ckpt_interval=2, optim_wrapper=guarded(loss_iters=[5, 6, 7]),
                          custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=3, max_rollbacks=1)], **common)
    if name == 'preempt':
        return toy_runner(work_dir, max_iters=8, ckpt_interval=100, optim_wrapper=guarded(),
                          custom_hooks=[RNGStateHook(), PreemptionHook(), _SignalRank1()], **common)
    raise ValueError(name)


def _worker(rank, world_size, port, root, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world_size)
    from projects.vim_disc.engine.checkpoint import install_safe_checkpoint_loading
    from projects.vim_disc.engine.optim_wrapper import SKIPS_TOTAL
    from tests.engine.toy_runner import weights
    install_safe_checkpoint_loading()
    results = {}
    for name in SCENARIOS:
        with open(osp.join(out, f'progress{rank}'), 'a') as f:
            f.write(name + '\n')
        runner = _scenario(name, osp.join(root, name))
        error = None
        try:
            runner.train()
        except Exception as e:  # noqa: BLE001  (reported to the parent)
            error = f'{type(e).__name__}: {e}'
        hub = runner.message_hub
        results[name] = dict(weights=weights(runner), iter=runner.iter, error=error,
                             skips=hub.get_info(SKIPS_TOTAL), rollbacks=hub.get_info('nonfinite_rollbacks'))
    torch.save(results, osp.join(out, f'rank{rank}.pth'))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp('ddp')
    out = tmp_path_factory.mktemp('results')
    ctx = mp.get_context('spawn')
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(root), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    progress = {r: (out / f'progress{r}').read_text().split() if (out / f'progress{r}').exists() else []
                for r in range(2)}
    assert not hung, f'ranks {hung} hung; scenarios reached: {progress}'
    assert all(p.exitcode == 0 for p in procs), f'exit codes {[p.exitcode for p in procs]}; reached {progress}'
    return root, [torch.load(out / f'rank{r}.pth', weights_only=True) for r in range(2)]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gradient_seen_by_one_rank_skips_everywhere(two_ranks):
    _, (r0, r1) = two_ranks
    a, b = r0['grad_skip'], r1['grad_skip']
    assert a['error'] is None and b['error'] is None
    assert a['skips'] == b['skips'] == 2 and a['iter'] == b['iter'] == 6
    assert _same(a['weights'], b['weights'])  # rank 0 did not step while rank 1 skipped


@pytest.mark.slow
def test_rollback_on_both_ranks_then_finish(two_ranks):
    _, (r0, r1) = two_ranks
    a, b = r0['rollback'], r1['rollback']
    assert a['error'] is None and b['error'] is None
    assert a['rollbacks'] == b['rollbacks'] == 1 and a['skips'] == b['skips'] == 3
    assert a['iter'] == b['iter'] == 10 and _same(a['weights'], b['weights'])


@pytest.mark.slow
def test_divergence_stops_both_ranks_at_the_same_iteration(two_ranks):
    _, (r0, r1) = two_ranks
    for r in (r0, r1):
        assert r['diverge']['error'].startswith('NonFiniteTrainingError: training diverged at iter 8')
        assert 'non-finite loss on ranks [1]' in r['diverge']['error']


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_at_one_boundary(two_ranks):
    from projects.vim_disc.engine.checkpoint import install_safe_checkpoint_loading
    install_safe_checkpoint_loading()
    root, (r0, r1) = two_ranks
    assert r0['preempt']['iter'] == r1['preempt']['iter'] == 3
    ckpt = torch.load(osp.join(root, 'preempt', 'iter_3.pth'), weights_only=True)
    assert len(ckpt['rng_state']['ranks']) == 2  # every rank's RNG state, gathered at the boundary
    assert _same(r0['preempt']['weights'], r1['preempt']['weights'])


"""Exact resume (RNG, data position, log dir) and the preemption hook, in one process."""
import os
import os.path as osp
import signal
import stat

import pytest
import torch
from mmengine.hooks import Hook

from projects.vim_disc.engine.hooks import PreemptionHook, RNGStateHook, uninstall_preemption_signal_handlers
from projects.vim_disc.engine.sampler import ResumableInfiniteSampler, ResumableIterBasedTrainLoop, ResumableRunner
from tests.engine.toy_runner import toy_runner, weights

SAMPLER = dict(type=ResumableInfiniteSampler, shuffle=True, seed=0)


def _loop(max_iters):
    return dict(type=ResumableIterBasedTrainLoop, max_iters=max_iters)


def _run(work_dir, max_iters=7, hooks=(), **kwargs):
    runner = toy_runner(work_dir, max_iters=max_iters, ckpt_interval=4, sampler=SAMPLER, train_cfg=_loop(max_iters),
                        custom_hooks=list(hooks), runner_cls=ResumableRunner, **kwargs)
    runner.train()
    return runner


@pytest.fixture(autouse=True)
def _no_leftover_handlers():
    yield
    uninstall_preemption_signal_handlers()


def _assert_same_weights(a, b):
    for k, v in weights(a).items():
        torch.testing.assert_close(weights(b)[k], v, rtol=0, atol=0)


def test_resume_restores_the_rng_state(tmp_path):
    """Dropout draws from the torch RNG every step: only a restored RNG state reproduces the run."""
    full = _run(tmp_path / 'full', hooks=[RNGStateHook()])
    resumed = _run(tmp_path / 'resumed', hooks=[RNGStateHook()], resume=True,
                   load_from=str(tmp_path / 'full' / 'iter_4.pth'))
    _assert_same_weights(full, resumed)
    # the control: the same resume without the hook does not reproduce it
    unrestored = _run(tmp_path / 'unrestored', hooks=[], resume=True, load_from=str(tmp_path / 'full' / 'iter_4.pth'))
    assert any(not torch.equal(weights(full)[k], v) for k, v in weights(unrestored).items())


class _SignalAt(Hook):
    """Sends a signal to this process after iteration ``at`` (runner.iter, 0-based)."""

    def __init__(self, at, signum=signal.SIGUSR1):
        self.at, self.signum = at, signum

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize('signum', [signal.SIGUSR1, signal.SIGTERM], ids=['SIGUSR1', 'SIGTERM'])
def test_preemption_saves_stops_and_resumes_exactly(tmp_path, signum):
    reference = _run(tmp_path / 'reference', hooks=[RNGStateHook()])

    work = tmp_path / 'preempted'
    first = _run(work, hooks=[RNGStateHook(), PreemptionHook(), _SignalAt(2, signum)], resume=True)
    assert first.iter == 3  # stopped at the boundary after the signal
    assert (work / 'iter_3.pth').exists()
    assert (work / 'last_checkpoint').read_text() == str(work / 'iter_3.pth')
    meta = torch.load(work / 'iter_3.pth', weights_only=True)['meta']
    assert meta['iter'] == 3 and meta['preempted_by'] == signal.Signals(signum).name

    second = _run(work, hooks=[RNGStateHook(), PreemptionHook()], resume=True)  # auto-resume, as after requeue
    assert second.iter == 7
    _assert_same_weights(reference, second)
    # both starts wrote into one log directory, one text log
    log_dirs = [d for d in os.listdir(work) if osp.isdir(work / d)]
    assert log_dirs == [first.timestamp] and second.timestamp == first.timestamp
    text = (work / first.timestamp / f'{first.timestamp}.log').read_text()
    assert 'saved' in text and 'restart with --resume' in text and 'resumed epoch: 0, iter: 3' in text


def test_preemption_reuses_a_checkpoint_saved_at_the_same_iteration(tmp_path, monkeypatch):
    saves = []
    real = ResumableRunner.save_checkpoint

    def spy(self, out_dir, filename, *args, **kwargs):
        saves.append(filename)
        return real(self, out_dir, filename, *args, **kwargs)

    monkeypatch.setattr(ResumableRunner, 'save_checkpoint', spy)
    runner = _run(tmp_path, hooks=[PreemptionHook(), _SignalAt(3)])  # iteration 4 is a checkpoint interval
    assert runner.iter == 4 and saves == ['iter_4.pth']
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'iter_4.pth')


def test_requeue_under_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    calls = tmp_path / 'calls'
    fake = bin_dir / 'scontrol'
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    runner = _run(tmp_path / 'wd', hooks=[PreemptionHook(), _SignalAt(1)])
    assert runner.iter == 2
    assert calls.read_text().split() == ['requeue', '4242']


def test_new_run_without_resume_gets_its_own_log_dir(tmp_path):
    a = _run(tmp_path, max_iters=1)
    stamp = (tmp_path / 'run_timestamp').read_text()
    assert stamp == a.timestamp
    (tmp_path / 'run_timestamp').write_text('20000101_000000')  # as if the first start was long ago
    b = _run(tmp_path, max_iters=2, resume=True)
    assert b.timestamp == '20000101_000000'
    c = _run(tmp_path, max_iters=1)
    assert c.timestamp != '20000101_000000' and (tmp_path / 'run_timestamp').read_text() == c.timestamp


def test_registered_for_configs():
    from mmdet.registry import RUNNERS
    assert RUNNERS.get('ResumableRunner') is ResumableRunner

"""The demo training under a real single-node SLURM: preemption, requeue, exact resume; time limits.

scripts/slurm_local.sh installs (apt-get, once) and starts slurmctld/slurmd/munge for this module and stops
them afterwards. Jobs go through tools/slurm_train.sh exactly as on a cluster; the only CPU-specific
settings are LAUNCHER=none (mmengine's slurm launcher calls torch.cuda.set_device) and GRES=''.
"""
import os
import os.path as osp
import re
import subprocess
import sys
import time

import pytest
import torch

from projects.vim_disc.engine.checkpoint import load_checkpoint_safely
from tests.ports import free_port

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
STATE = '/tmp/vim_disc_slurm'

# The demo with every resilience piece switched on, kept small (2 Vim layers, batch 2, no validation).
CONFIG = f'''
_base_ = {osp.join(ROOT, 'configs/demo/vim_demo.py')!r}
custom_imports = dict(imports=['projects.vim_disc', 'projects.vim_disc.engine.hooks',
                               'projects.vim_disc.engine.sampler', 'projects.vim_disc.engine.optim_wrapper'],
                      allow_failed_imports=False)
model = dict(backbone=dict(arch=dict(depth=2)))
train_dataloader = dict(num_workers=0, persistent_workers=False, batch_size=2,
                        sampler=dict(type='ResumableInfiniteSampler', shuffle=True),
                        batch_sampler=dict(type='ResumableAspectRatioBatchSampler'))
train_cfg = dict(_delete_=True, type='ResumableIterBasedTrainLoop', max_iters=4, val_interval=100000)
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
runner_type = 'ResumableRunner'
optim_wrapper = dict(type='GuardedOptimWrapper')
custom_hooks = [dict(type='RNGStateHook'), dict(type='PreemptionHook')]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=100000))
randomness = dict(seed=0, deterministic=True)
'''


def _sh(*args, check=True, **kwargs):
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, check=check, **kwargs)


@pytest.fixture(scope='module')
def slurm():
    proc = _sh('bash', 'scripts/slurm_local.sh', 'start', check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the dataset exists before two processes want it at once
    _sh(sys.executable, 'tools/generate_shapes.py', timeout=600)
    yield
    _sh('bash', 'scripts/slurm_local.sh', 'stop', check=False, timeout=300)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / 'resilient_demo.py'
    path.write_text(CONFIG)
    return str(path)


def _submit(work_dir, config, iters, **env):
    env = {**os.environ, 'GPUS': '1', 'GPUS_PER_NODE': '1', 'CPUS_PER_TASK': '1', 'GRES': '', 'LAUNCHER': 'none',
           'PYTHON': sys.executable, **env}
    env.pop('PYTHONPATH', None)
    proc = _sh('bash', 'tools/slurm_train.sh', 'debug', 'vimdisc-test', config, str(work_dir),
               '--cfg-options', f'train_cfg.max_iters={iters}', env=env)
    return proc.stdout.strip()


def _out(work_dir, job):
    path = osp.join(work_dir, f'slurm-{job}.out')
    return open(path).read() if osp.exists(path) else ''


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


def _reference(tmp_path, cmd, env=None):
    """The uninterrupted run to compare with, in the background; its output kept for a failure's message."""
    log = tmp_path / 'reference.log'
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _queued(job):
    return bool(_sh('squeue', '-h', '-j', job, '-o', '%i', check=False).stdout.strip())


def _iters_logged(log, max_iters):
    return [int(i) for i in re.findall(rf'Iter\(train\) \[\s*(\d+)/{max_iters}\]', log)]


def _weights(path):
    return load_checkpoint_safely(str(path), map_location='cpu')['state_dict']


def _python_choice(case, tmp_path):
    """(environment for the python the job runs, the word expected to start its srun command line)."""
    if case == 'override':
        return {'PYTHON': '/opt/my python/bin/python3'}, r'/opt/my\ python/bin/python3'
    if case == 'VIM_DISC_VENV':
        venv = tmp_path / 'my venv'  # a space: the interpreter's path must stay one word too
        (venv / 'bin').mkdir(parents=True)
        (venv / 'bin' / 'python').write_text('#!/bin/sh\n')
        (venv / 'bin' / 'python').chmod(0o755)
        return {'VIM_DISC_VENV': str(venv)}, str(venv / 'bin' / 'python').replace(' ', r'\ ')
    if case == 'no venv':
        return {'VIM_DISC_VENV': str(tmp_path / 'no venv here')}, 'python'
    # the default: the repo's .venv, where scripts/setup_env.sh installs everything
    venv_python = osp.join(ROOT, '.venv', 'bin', 'python')
    assert os.access(venv_python, os.X_OK), f'{venv_python} missing: run scripts/setup_env.sh'
    return {}, venv_python


@pytest.mark.parametrize('python', ['repo .venv', 'VIM_DISC_VENV', 'no venv', 'override'])
def test_submission_options_for_a_multi_node_job(tmp_path, python):
    """No SLURM needed: a stand-in sbatch records its options and the job script it is given."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'sbatch').write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/options\ncat > {tmp_path}/script\necho 77\n')
    (bin_dir / 'sbatch').chmod(0o755)
    python_env, python_word = _python_choice(python, tmp_path)
    env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'GPUS': '16', 'GPUS_PER_NODE': '8',
           'CPUS_PER_TASK': '6', 'TIME': '24:00:00', 'SIGNAL_SECONDS': '900', 'SRUN_ARGS': '--mpi=none'}
    for name in ('PYTHON', 'VIM_DISC_VENV'):  # the caller's own choice must not leak into the default cases
        env.pop(name, None)
    env.update(python_env)
    work = tmp_path / 'work dir'  # a space: every path must stay one word
    proc = _sh('bash', 'tools/slurm_train.sh', 'gpu', 'vim-zoh', 'configs/vim_zoh.py', str(work), '--amp',
               '--cfg-options', "optim_wrapper.optimizer.lr=2e-4", env=env)
    assert proc.stdout.strip() == '77'
    options = (tmp_path / 'options').read_text().split()
    for expected in ('--partition=gpu', '--job-name=vim-zoh', '--nodes=2', '--ntasks=16', '--ntasks-per-node=8',
                     '--cpus-per-task=6', '--gres=gpu:8', '--time=24:00:00', '--signal=B:USR1@900', '--requeue',
                     '--open-mode=append'):
        assert expected in options, (expected, options)
    script = (tmp_path / 'script').read_text()
    srun = ' '.join(next(line for line in script.splitlines() if line.startswith('srun ')).split())
    assert srun.startswith(f'srun --kill-on-bad-exit=1 --mpi=none {python_word} -u tools/train.py configs/vim_zoh.py ')
    assert r'--work-dir ' + str(work).replace(' ', r'\ ') in srun
    assert srun.endswith('--launcher slurm --resume --amp --cfg-options optim_wrapper.optimizer.lr=2e-4 &')
    assert "trap forward USR1" in script and 'kill -USR1 "$SRUN_PID"' in script
    assert f'--output={work}/slurm-%j.out' in (tmp_path / 'options').read_text()


def _preempt_mid_run(work, job, iters, reference):
    """USR1 once iteration 2 is logged; wait for the requeued job and the reference run; check the stop and the
    resume. Returns the job's output before and after the requeue."""
    _wait(lambda: 2 in _iters_logged(_out(work, job), iters), 900, 'iteration 2')
    _sh('scancel', '--signal=USR1', '--batch', job)  # what --signal=B:USR1@T delivers before a time limit
    _wait(lambda: (work / f'iter_{iters}.pth').exists() and not _queued(job), 1200, 'the requeued job to finish')
    assert reference.wait(timeout=1200) == 0, reference.log.read_text()[-4000:]

    out = _out(work, job)
    assert 'SLURM_RESTART_COUNT=0' in out and 'SLURM_RESTART_COUNT=1' in out
    first, second = out.split('SLURM_RESTART_COUNT=1')
    saved = re.search(r'SIGUSR1: saved (\S+iter_(\d+)\.pth) at iter (\d+); requeued SLURM job (\d+)', first)
    assert saved, first[-4000:]
    k = int(saved.group(2))
    assert saved.group(4) == job and 2 <= k < iters
    # the stop came at the boundary right after the signal reached the job: only the iteration in flight
    # when the batch shell forwarded it finished after it
    done_before_signal = _iters_logged(first[:first.index('USR1 at')], iters)
    assert k - max(done_before_signal) <= 1, (k, done_before_signal)
    ckpt = load_checkpoint_safely(saved.group(1), map_location='cpu')
    assert ckpt['meta']['iter'] == k and ckpt['meta']['preempted_by'] == 'SIGUSR1'
    assert max(_iters_logged(first, iters)) == k  # nothing trained after the checkpoint was lost
    assert f'resumed epoch: 0, iter: {k}' in second
    assert min(_iters_logged(second, iters)) == k + 1  # resumed at k, nothing replayed
    return first, second


def _assert_same_weights(checkpoint, expected_checkpoint):
    final, expected = _weights(checkpoint), _weights(expected_checkpoint)
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_preempted_job_requeues_and_matches_an_uninterrupted_run(slurm, config, tmp_path):
    ref_dir, work = tmp_path / 'reference', tmp_path / 'slurm'
    # enough iterations that the stop lands mid-run however long SLURM takes to deliver the signal
    iters = 16
    reference = _reference(tmp_path, [sys.executable, 'tools/train.py', config, '--work-dir', str(ref_dir),
                                      '--cfg-options', f'train_cfg.max_iters={iters}'])  # without SLURM, alongside
    job = _submit(work, config, iters)
    _preempt_mid_run(work, job, iters, reference)
    # one log directory across the restart
    assert len([d for d in os.listdir(work) if osp.isdir(work / d)]) == 1
    _assert_same_weights(work / f'iter_{iters}.pth', ref_dir / f'iter_{iters}.pth')


@pytest.mark.slow
def test_time_limit_with_signal_loses_nothing_since_the_signal(slurm, config, tmp_path):
    work = tmp_path / 'limited'
    # 2 minutes, warned 45 s before; slurmctld checks on a ~30 s tick, so the warning comes up to ~30 s early
    # (seen: 19 s), still after the trainer installed its handlers
    job = _submit(work, config, 1000, TIME='2', SIGNAL_SECONDS='45')
    _wait(lambda: 'SLURM_RESTART_COUNT=1' in _out(work, job), 600, 'the requeue before the time limit')
    _sh('scancel', job)
    _wait(lambda: not _queued(job), 120, 'the job to leave the queue')

    first = _out(work, job).split('SLURM_RESTART_COUNT=1')[0]
    assert 'USR1 at' in first and 'DUE TO TIME LIMIT' not in first
    saved = re.search(r'SIGUSR1: saved (\S+iter_(\d+)\.pth) at iter (\d+); requeued', first)
    assert saved, first[-4000:]
    k = int(saved.group(2))
    trained = _iters_logged(first, 1000)
    assert trained and max(trained) == k  # every iteration trained before the stop is in the checkpoint
    signal_at = first.index('USR1 at')
    done_before_signal = _iters_logged(first[:signal_at], 1000)
    assert k - max(done_before_signal, default=0) <= 1  # only the iteration in flight finished after it
    assert load_checkpoint_safely(saved.group(1), map_location='cpu')['meta']['iter'] == k
    log = open(osp.join(STATE, 'slurmctld.log')).read()
    assert re.search(rf'[Rr]equeu\w* JobId={job}', log)


@pytest.mark.slow
def test_two_task_job_preempts_on_every_rank_and_matches_torchrun(slurm, config, tmp_path):
    """srun with 2 tasks (--launcher slurm, gloo): USR1 reaches both ranks, they stop at one boundary, rank 0
    requeues, both resume; the result equals the same 2-process training under torchrun, uninterrupted."""
    ref_dir, work, iters = tmp_path / 'torchrun', tmp_path / 'slurm2', 12
    # torchrun gives each process OMP_NUM_THREADS=1; the SLURM tasks get the same (sbatch exports the environment),
    # since another thread count changes float reduction orders and the weights would differ in the last bits
    threads = {'OMP_NUM_THREADS': '1'}
    env = {**os.environ, 'PORT': str(free_port()), 'PYTHON': sys.executable, **threads}
    env.pop('PYTHONPATH', None)
    reference = _reference(tmp_path, ['bash', 'tools/dist_train.sh', config, '2', '--work-dir', str(ref_dir),
                                      '--cfg-options', f'train_cfg.max_iters={iters}', 'env_cfg.dist_cfg.backend=gloo'],
                           env=env)
    job = _submit(work, config, iters, GPUS='2', GPUS_PER_NODE='2', LAUNCHER='slurm', **threads)

    first, second = _preempt_mid_run(work, job, iters, reference)
    assert 'Distributed training: True' in first and 'Distributed training: True' in second
    _assert_same_weights(work / f'iter_{iters}.pth', ref_dir / f'iter_{iters}.pth')

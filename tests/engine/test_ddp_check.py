"""benchmarks/benchmark_ddp.py on the CPU: its checks (2 gloo processes through tools/dist_train.sh), each able to fail.

One run of the benchmark on the demo detector at a tiny size (2 layers, 4 iterations, batch 1, one dataloader
worker per process as on the GPU, where SeedFromStreamPosition makes augmentation a function of the sample's
stream position) leaves the records and checkpoints that the tests read. The negative controls judge mutated
copies of them with the same verdict functions; one more run gives the 1-process reference another data order,
which must fail the equivalence; one run is killed by its timeout (its ranks included).
"""
import copy
import json
import os
import os.path as osp
import sys
import time

import pytest
import torch

from tests.benchmarks import import_benchmark
from tests.tools.test_train import DEMO, SMALL, run_tool

bench = import_benchmark('benchmark_ddp')
ITERS = 4  # N: the stop is after 2, the guard run's NaN at iteration 3 (defaults for N = 4)


def run_check(work_dir, *extra, options=()):
    args = [sys.executable, 'benchmarks/benchmark_ddp.py', DEMO, '--device', 'cpu', '--iters', str(ITERS),
            '--work-dir', str(work_dir), *extra, '--cfg-options', *SMALL, *options]
    proc = run_tool(args, timeout=600, check=False)
    out = osp.join(work_dir, 'ddp.json')
    assert osp.exists(out), f'no JSON ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    with open(out) as f:
        return proc, json.load(f)


@pytest.fixture(scope='module')
def check(tmp_path_factory):
    work = tmp_path_factory.mktemp('ddp_check')
    proc, report = run_check(work, options=['train_dataloader.num_workers=1'])
    return work, proc, report


def _records(work, name, world_size=2):
    return bench.read_records(str(work / ('resume' if name in ('stop', 'resume') else name)), name, world_size)


def _ok_run(name):
    return dict(name=name, rc=0)


# ---------------------------------------------------------------------------------------------------
# The checks pass on the product
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_all_checks_pass_and_the_table_comes_last(check):
    _, proc, report = check
    assert proc.returncode == 0 and report['passed'], proc.stdout[-3000:]
    assert set(report['checks']) == {'launch', 'equivalence', 'guard', 'resume', 'throughput'}
    assert proc.stdout.rstrip().splitlines()[-1].split() == ['all', 'PASS']


@pytest.mark.slow
def test_two_gloo_ranks_train_log_and_write_one_checkpoint(check):
    _, _, report = check
    launch = report['checks']['launch']
    assert launch['passed'], launch['problems']
    assert (launch['world_size'], launch['backend'], launch['wrapper']) == (2, 'gloo', 'MMDistributedDataParallel')
    assert launch['checkpoints'] == [f'iter_{ITERS}.pth'] and launch['iters_recorded'] == [ITERS, ITERS]


@pytest.mark.slow
def test_two_ranks_equal_one_process_that_accumulates_two(check):
    _, _, report = check
    eq = report['checks']['equivalence']
    assert eq['passed'], eq['problems']
    assert eq['same_initial_weights'] and eq['samples_compared'] == 2 * ITERS and eq['sample_id_mismatches'] == 0
    assert eq['losses']['max_rel'] <= eq['loss_rtol'] and eq['weights']['drift'] <= eq['weight_rtol']
    assert eq['weights']['movement'] > 0  # the weights moved: equal final weights are not trivially equal


@pytest.mark.slow
def test_nan_on_one_rank_skips_that_update_on_both(check):
    _, _, report = check
    guard = report['checks']['guard']
    assert guard['passed'], guard['problems']
    nan_iter = guard['nan_iter']
    for rank in guard['per_rank']:
        assert rank['skips_total'] == 1 and rank['skipped_iters'] == rank['unchanged_iters'] == [nan_iter]
        assert rank['last_skip']['loss_ranks'] == [1]


@pytest.mark.slow
def test_stop_on_a_signal_and_resume_equal_the_uninterrupted_run(check):
    work, _, report = check
    resume = report['checks']['resume']
    assert resume['passed'], resume['problems']
    assert resume['stopped_at'] == ITERS // 2 and resume['losses']['n'] == 2 * (ITERS - ITERS // 2)
    assert (work / 'resume' / f'iter_{ITERS // 2}.pth').exists()  # written by the PreemptionHook at the stop


@pytest.mark.slow
def test_throughput_comes_from_the_logged_time_per_iteration(check):
    work, _, report = check
    tp = report['checks']['throughput']
    rows = _records(work, 'ddp')[0]['iters']
    times = [rows[i]['time'] for i in sorted(rows) if i > tp['warmup_iters']]
    assert tp['two']['iters'] == len(times) and tp['two']['images_per_s'] == pytest.approx(2 * len(times) / sum(times))
    assert tp['scaling_efficiency'] == pytest.approx(tp['two']['images_per_s'] / (2 * tp['one']['images_per_s']))


# ---------------------------------------------------------------------------------------------------
# Each check can fail
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_equivalence_fails_when_the_reference_sees_another_data_order(tmp_path):
    # no dataloader workers here: augmentation in the main process, seeded by the benchmark's hook
    proc, report = run_check(tmp_path, '--checks', 'equivalence', '--reference-cfg-options',
                             'train_dataloader.sampler.seed=1')
    eq = report['checks']['equivalence']
    assert proc.returncode == 1 and not report['passed'] and not eq['passed']
    problems = ' | '.join(eq['problems'])
    # each part of the verdict sees it: the sample ids, the per-sample losses, the final weights
    assert 'different samples' in problems and 'per-sample losses differ' in problems
    assert 'final weights drift' in problems and eq['weights']['drift'] > 0.1


@pytest.mark.slow
@pytest.mark.parametrize('mutation', ['none', 'rank 1 missed an iteration', 'two checkpoints', 'replicas apart',
                                      'a loss is NaN', 'run failed'])
def test_launch_verdict_fails_on(mutation, check):
    work, _, _ = check
    recs, ckpts = _records(work, 'ddp'), [f'iter_{ITERS}.pth']
    run, logged = _ok_run('ddp'), bench.logged_iterations(str(work / 'ddp'))
    if mutation == 'rank 1 missed an iteration':
        del recs[1]['iters'][2]
    elif mutation == 'two checkpoints':
        ckpts.append('iter_2.pth')
    elif mutation == 'replicas apart':
        recs[1]['iters'][3]['fingerprint'] = 'other'
    elif mutation == 'a loss is NaN':
        recs[0]['iters'][ITERS]['losses']['loss'] = float('nan')
    elif mutation == 'run failed':
        run = dict(name='ddp', rc=None, hung=True, timeout_s=5)
    verdict = bench.verdict_launch(run, recs, ITERS, ckpts, logged)
    assert verdict['passed'] == (mutation == 'none'), verdict['problems']


@pytest.mark.slow
@pytest.mark.parametrize('mutation', ['none', 'loss-scale overflow too', 'rank 0 stepped', 'counters disagree',
                                      'wrong rank named', 'skipped another update too', 'stopped early'])
def test_guard_verdict_fails_on(mutation, check):
    work, _, report = check
    nan_iter, iters = report['checks']['guard']['nan_iter'], report['checks']['guard']['iters']
    recs = _records(work, 'guard')
    if mutation == 'rank 0 stepped':  # a guard that decided per rank: rank 0 applied its update
        recs[0]['iters'][nan_iter]['fingerprint'] = 'stepped'
        recs[0]['iters'][nan_iter]['skipped'] = False
    elif mutation == 'counters disagree':
        recs[1]['iters'][iters]['skips'] = 2
    elif mutation == 'wrong rank named':
        recs[0]['iters'][nan_iter]['last_skip']['loss_ranks'] = [0, 1]
    elif mutation == 'skipped another update too':
        for rec in recs:
            rec['iters'][nan_iter + 1]['fingerprint'] = rec['iters'][nan_iter]['fingerprint']
    elif mutation == 'stopped early':
        for rec in recs:
            del rec['iters'][iters]
    elif mutation == 'loss-scale overflow too':  # GradScaler's own skip (AMP) also leaves the weights: no failure
        for rec in recs:
            rec['iters'][nan_iter + 1]['fingerprint'] = rec['iters'][nan_iter]['fingerprint']
            for i in range(nan_iter + 1, iters + 1):
                rec['iters'][i]['amp_overflows'] = 1
    verdict = bench.verdict_guard(_ok_run('guard'), recs, iters, nan_iter)
    assert verdict['passed'] == (mutation in ('none', 'loss-scale overflow too')), verdict['problems']


@pytest.mark.slow
@pytest.mark.parametrize('mutation', ['none', 'weights off', 'stopped late', 'resumed elsewhere', 'loss off'])
def test_resume_verdict_fails_on(mutation, check):
    work, _, report = check
    half = ITERS // 2
    ddp_w = bench.load_weights(str(work / 'ddp' / f'iter_{ITERS}.pth'))
    resumed_w = bench.load_weights(str(work / 'resume' / f'iter_{ITERS}.pth'))
    init_w = torch.load(work / 'ddp' / 'init_weights.pth', weights_only=True)
    stop, resumed, ddp = _records(work, 'stop'), _records(work, 'resume'), _records(work, 'ddp')
    if mutation == 'weights off':  # one tensor off by a thousandth of the training's movement
        key = next(k for k, v in resumed_w.items() if torch.is_floating_point(v))
        resumed_w = copy.copy(resumed_w)
        movement = bench.compare_weights(ddp_w, ddp_w, init_w)['movement']
        resumed_w[key] = resumed_w[key] + 1e-3 * movement / resumed_w[key].numel() ** 0.5
    elif mutation == 'stopped late':
        stop[1]['iters'][half + 1] = dict(stop[1]['iters'][half], iter=half + 1)
    elif mutation == 'resumed elsewhere':
        resumed[0]['start']['iter'] = 0
    elif mutation == 'loss off':
        resumed[1]['iters'][ITERS]['losses']['loss'] *= 1 + 1e-4
    r = report['checks']['resume']
    verdict = bench.verdict_resume(_ok_run('stop'), _ok_run('resume'), stop, resumed, ddp, half, ITERS,
                                   [f'iter_{half}.pth'], resumed_w, ddp_w, init_w, r['weight_rtol'], r['loss_rtol'])
    assert verdict['passed'] == (mutation == 'none'), verdict['problems']


def _processes_mentioning(text):
    """Live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                cmdline = f.read().replace(b'\0', b' ').decode(errors='replace')
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry), cmdline))
    return found


@pytest.mark.slow
def test_a_run_past_its_timeout_is_killed_with_every_process_under_it(tmp_path):
    args = bench.parse_args([DEMO, '--device', 'cpu', '--run-timeout', '8', '--min-run-s', '1',
                             '--work-dir', str(tmp_path), '--cfg-options', *SMALL])
    cfg = bench.derive_config(args, 'ddp', str(tmp_path / 'ddp'), max_iters=ITERS)
    run = bench.launch(args, 'ddp', 2, cfg, str(tmp_path / 'ddp'), bench.Budget(None))
    assert run['hung'] and run['seconds'] < 60
    # torchrun and both ranks (each in a session of its own, deaf to SIGTERM): all gone (killed processes
    # leave /proc once reaped: give the kernel and init a moment on a loaded machine)
    deadline = time.monotonic() + 15
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(tmp_path)) == []
    assert 'hung' in bench.verdict_launch(run, _records(tmp_path, 'ddp'), ITERS, [], [])['problems'][0]
    # a budget that is spent skips the run instead of starting it
    skipped = bench.launch(args, 'ddp', 2, cfg, str(tmp_path / 'ddp'), bench.Budget(1))
    assert skipped['rc'] is None and skipped['skipped'].startswith('out of time')

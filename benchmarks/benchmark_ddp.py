"""Two processes of one config through ``tools/dist_train.sh``: runs, equals one process, guards, resumes, scales.

    python benchmarks/benchmark_ddp.py [CONFIG] --device cuda|cpu [--iters 30] [--out ddp.json] \
        [--cfg-options model.backbone.init_cfg=None ...]

CONFIG defaults to ``configs/shapes1024/vim_zoh.py``. Every run is the real tool (``tools/dist_train.sh CONFIG 2``
or ``tools/train.py`` for one process) on a config derived from CONFIG and dumped into its work dir: batch 1 per
process, the sampler's seed fixed, a constant learning rate (the config's base lr: a warm-up would leave the
weights almost where they started and make every comparison trivially equal), no validation, a log line per
iteration and one checkpoint at the end. Three test-side hooks (``ddp_check_hooks.py``, which the training
processes import through ``custom_imports``) write one JSON line per rank and iteration (losses, image ids, the guard's skip
counters, a fingerprint of the weights, the log's time per iteration), re-seed every RNG at each iteration
boundary from the position of the iteration's first sample in the global stream, and signal one rank.

Checks (``--checks``), each with its verdict and its exact numbers in the JSON:

launch       ``ddp``: 2 ranks x N iterations: exit 0, both ranks record every iteration with finite losses,
             rank 0's log has N iterations, one checkpoint (``iter_N.pth``), the two replicas' weights equal
             after every iteration.
equivalence  ``ddp`` against ``single``: 1 process, batch 1, ``accumulative_counts=2``, 2N iterations. The
             project's sampler gives rank r of W the global samples r, r + W, ...; so ``ddp`` rank r's iteration
             i and ``single``'s iteration 2i + r see the same image (checked by id), with the same RNG draws
             (the seeding hook), and each update averages the same two gradients. Batch 2 in one process is
             not the reference on purpose: a detector's batch loss is not the mean of its per-image losses
             (``loss_mask`` averages over the positive RoIs of the whole batch, the RPN / RoI samplers draw both
             images from one random stream, batch padding changes the Vim token sequence), so even a perfect
             DDP would differ from it. Compared: same initial weights, per-sample losses (max abs / rel), final
             weights (max abs, max abs over max |w|, and drift = |w_ddp - w_single| / |w_single - w_init|).
guard        ``guard``: 2 ranks, a NaN loss on rank 1 at iteration ``--nan-iter`` (the optimizer wrapper's own
             ``inject_nonfinite`` switch): that update skipped on both ranks (weights unchanged there, changed at
             every other iteration but a loss-scale overflow's), both ranks' skip counters 1 with
             ``loss_ranks == [1]``, the replicas equal, finite losses after it, the run finishes.
resume       ``stop``: 2 ranks, SIGUSR1 to rank 1 after iteration N/2 (the PreemptionHook checkpoints at the
             boundary both ranks agree on and stops); ``resume``: ``--resume`` to N. Its final weights and its
             losses of iterations N/2+1..N against ``ddp``'s.
throughput   images/s on 1 process (``single``) and 2 (``ddp``), from the training log's time per iteration
             (mmengine's ``train/time``) after ``--warmup-iters``; scaling efficiency = ips_2 / (2 ips_1). At batch
             1 per GPU; ``single``'s iterations alternate backward-only and backward+step (accumulation).

Every wait has a timeout (each run: ``--run-timeout``, all together: ``--budget-s``; a run that exceeds it is
killed with every process under it and reported as hung); collectives get ``env_cfg.dist_cfg.timeout``. NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1). Writes one
JSON (``--out``) and prints a table last. ``--reference-cfg-options`` changes the ``single`` run only (a negative
control: e.g. another sampler seed must fail the equivalence).
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import signal
import socket
import subprocess
import sys
import time

from _bootstrap import setup_repo_path

REPO_ROOT = setup_repo_path()
BENCH_DIR = osp.dirname(osp.abspath(__file__))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

from ddp_verdicts import (compare_weights, throughput, verdict_equivalence, verdict_guard, verdict_launch,  # noqa: E402,F401
                          verdict_resume)

DEFAULT_CONFIG = 'configs/shapes1024/vim_zoh.py'
MODULE = 'ddp_check_hooks'  # the test-side hooks the training processes import (benchmarks/ on their PYTHONPATH)
NO_MULTICAST = dict(NCCL_NVLS_ENABLE='0', TORCH_SYMM_MEM_DISABLE_MULTICAST='1', NVSHMEM_DISABLE_NVLS='1')


# ---------------------------------------------------------------------------------------------------
# Runs (in the benchmark's process)
# ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def derive_config(args, name: str, work_dir: str, *, max_iters: int, accumulate: int = 1, inject=None,
                  signal_after=None, extra_options=None) -> str:
    """The run's config: CONFIG + --cfg-options + the check's settings (module docstring), dumped into work_dir."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    loader = cfg.train_dataloader
    loader.batch_size = 1
    loader.sampler['seed'] = args.seed  # a fixed order (InfiniteSampler would draw one from rank 0)
    cfg.randomness = dict(cfg.get('randomness', {}), seed=args.seed)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    for split in ('val', 'test'):
        cfg[f'{split}_dataloader'] = cfg[f'{split}_cfg'] = cfg[f'{split}_evaluator'] = None
    cfg.param_scheduler = None  # constant lr: see the module docstring
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.update(interval=max_iters, by_epoch=False)
    cfg.optim_wrapper.accumulative_counts = accumulate
    if inject is not None:
        cfg.optim_wrapper.inject_nonfinite = inject
    if extra_options:  # last: a negative control may undo any of the above
        cfg.merge_from_dict(extra_options)
    cfg.env_cfg.setdefault('dist_cfg', {})
    cfg.env_cfg.dist_cfg.update(backend=args.backend, timeout=args.collective_timeout)
    imports = list(cfg.get('custom_imports', {}).get('imports', []))
    cfg.custom_imports = dict(imports=imports + [MODULE], allow_failed_imports=False)
    hooks = list(cfg.get('custom_hooks', None) or [])
    if signal_after is not None:
        if not any(h.get('type') == 'PreemptionHook' for h in hooks):
            hooks.append(dict(type='PreemptionHook'))
        hooks.append(dict(type='DDPCheckSignalHook', rank=1, after_iter=signal_after))
    hooks.append(dict(type='DDPCheckRecordHook', path=osp.join(work_dir, f'records_{name}_rank{{rank}}.jsonl'),
                      save_init=osp.join(work_dir, 'init_weights.pth')))
    hooks.append(dict(type='DDPCheckSeedHook', seed=args.seed, batch_size=1))
    cfg.custom_hooks = hooks
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, f'config_{name}.py')
    cfg.dump(path)
    return path


_RUNNING = []  # the run being waited for: killed with all its processes when this script is terminated


def descendants(pid: int) -> list:
    """The live descendants of ``pid`` (from /proc, Linux)."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])  # "pid (comm) state ppid ..."
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_run(proc) -> None:
    """SIGKILL the launcher and every process below it, by id. Its process group is not enough: torchrun starts
    each rank in a session of its own, and the ranks take SIGTERM as a preemption notice (PreemptionHook).
    The tree is frozen first (SIGSTOP, re-listed until it stops growing: a stopped process cannot fork a
    dataloader worker that would escape the list), then killed while every process is still in it."""
    frozen = set()
    while True:
        new = [pid for pid in [proc.pid] + descendants(proc.pid) if pid not in frozen]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        frozen.update(new)
    for pid in frozen:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_running_and_exit(signum, frame):
    for proc in _RUNNING:
        kill_run(proc)
    sys.exit(128 + signum)


class Budget:
    def __init__(self, total_s):
        self.end = None if total_s is None else time.monotonic() + total_s

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def launch(args, name: str, world_size: int, cfg_path: str, work_dir: str, budget: Budget,
           resume: bool = False) -> dict:
    """Run the tool; every wait bounded: a run past its timeout is killed with all its processes."""
    limit = min(args.run_timeout, budget.left() - 5)
    run = dict(name=name, world_size=world_size, work_dir=work_dir)
    if limit < args.min_run_s:
        return dict(run, rc=None, skipped=f'out of time ({budget.left():.0f} s left)')
    if world_size > 1:
        cmd = ['bash', 'tools/dist_train.sh', cfg_path, str(world_size)]
    else:
        cmd = [sys.executable, 'tools/train.py', cfg_path, '--launcher', 'none']
    cmd += ['--work-dir', work_dir] + (['--resume'] if resume else [])
    env = {**os.environ, **NO_MULTICAST, 'PYTHON': sys.executable, 'PORT': str(_free_port()),
           'PYTHONUNBUFFERED': '1'}
    env['PYTHONPATH'] = os.pathsep.join([BENCH_DIR, REPO_ROOT] + [p for p in env.get('PYTHONPATH', '').split(
        os.pathsep) if p])
    env.setdefault('OMP_NUM_THREADS', '1')  # torchrun's default for 2 processes; the same for one
    if args.device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # the tools' gloo path (init_cpu_process_group)
    elif world_size == 1:
        env['CUDA_VISIBLE_DEVICES'] = env.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]
    log_path = osp.join(work_dir, f'{name}.log')
    os.makedirs(work_dir, exist_ok=True)
    start = time.monotonic()
    with open(log_path, 'a') as log:
        log.write(f'$ {" ".join(cmd)}\n')
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _RUNNING.append(proc)
        try:
            rc, hung = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            kill_run(proc)  # torchrun, both ranks and their dataloader workers
            rc, hung = proc.wait(timeout=60), True
        finally:
            _RUNNING.remove(proc)
    seconds = time.monotonic() - start
    print(f'  {name}: rc {rc}{" (killed: past " + str(int(limit)) + " s)" if hung else ""} in {seconds:.0f} s',
          flush=True)
    return dict(run, cmd=' '.join(cmd), pid=proc.pid, rc=rc, hung=hung, seconds=seconds, timeout_s=limit,
                log=log_path)


def read_records(work_dir: str, name: str, world_size: int) -> list:
    """Per rank: {'start': row, 'iters': {iter: row}, 'end': row or None}."""
    ranks = []
    for r in range(world_size):
        path = osp.join(work_dir, f'records_{name}_rank{r}.jsonl')
        rec = dict(start=None, iters={}, end=None)
        if osp.exists(path):
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    if row['event'] == 'iter':
                        rec['iters'][row['iter']] = row
                    else:
                        rec[row['event']] = row
        ranks.append(rec)
    return ranks


def load_weights(path: str) -> dict:
    from projects.vim_disc.engine import load_checkpoint_safely
    ckpt = load_checkpoint_safely(path, map_location='cpu')
    return ckpt.get('state_dict', ckpt)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', default=DEFAULT_CONFIG)
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    p.add_argument('--backend', choices=['nccl', 'gloo'], help='default: nccl on cuda, gloo on cpu')
    p.add_argument('--checks', nargs='+', default=['launch', 'equivalence', 'guard', 'resume', 'throughput'],
                   choices=['launch', 'equivalence', 'guard', 'resume', 'throughput'])
    p.add_argument('--iters', type=int, help='N: iterations of the 2-rank run (default 30 on cuda, 4 on cpu)')
    p.add_argument('--guard-iters', type=int, help='iterations of the guard run (default min(N, 12))')
    p.add_argument('--nan-iter', type=int, help='1-based iteration whose loss is NaN on rank 1 (default '
                   'guard_iters // 2 + 1: after the backbone\'s CUDA graph is captured)')
    p.add_argument('--warmup-iters', type=int, help='iterations left out of the throughput (default N // 3)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--loss-rtol', type=float, help='per-sample loss, relative (default 5e-3 cuda, 1e-5 cpu)')
    p.add_argument('--weight-rtol', type=float,
                   help='final weights: |w - w_ref| / |w_ref - w_init| (default 2e-2 cuda, 1e-5 cpu)')
    p.add_argument('--run-timeout', type=float, default=600, help='seconds per training run')
    p.add_argument('--budget-s', type=float, help='seconds for all runs together')
    p.add_argument('--min-run-s', type=float, default=20, help='a run with less time left than this is skipped')
    p.add_argument('--collective-timeout', type=int, default=180, help='env_cfg.dist_cfg.timeout (seconds)')
    p.add_argument('--work-dir', default='work_dirs/benchmark_ddp')
    p.add_argument('--out', help='JSON (default WORK_DIR/ddp.json)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='applied to every run')
    p.add_argument('--reference-cfg-options', nargs='+', action=DictAction,
                   help='applied to the 1-process reference run only (negative controls)')
    args = p.parse_args(argv)
    cpu = args.device == 'cpu'
    args.backend = args.backend or ('gloo' if cpu else 'nccl')
    args.iters = args.iters or (4 if cpu else 30)
    if args.iters < 2:
        p.error('--iters must be >= 2 (the resume check stops at N // 2)')
    args.guard_iters = args.guard_iters or min(args.iters, 12)
    args.nan_iter = args.nan_iter or args.guard_iters // 2 + 1
    if not 1 <= args.nan_iter < args.guard_iters:
        p.error('--nan-iter must be in [1, guard_iters)')
    args.warmup_iters = args.iters // 3 if args.warmup_iters is None else args.warmup_iters
    args.loss_rtol = args.loss_rtol if args.loss_rtol is not None else (1e-5 if cpu else 5e-3)
    args.weight_rtol = args.weight_rtol if args.weight_rtol is not None else (1e-5 if cpu else 2e-2)
    if not osp.isabs(args.config) and not osp.exists(args.config):
        args.config = osp.join(REPO_ROOT, args.config)
    args.work_dir = osp.abspath(args.work_dir)
    args.out = args.out or osp.join(args.work_dir, 'ddp.json')
    return args


def main(argv=None):
    args = parse_args(argv)
    if not osp.exists(args.config):
        sys.exit(f'config not found: {args.config}')
    if args.device == 'cuda' and torch.cuda.device_count() < 2:
        sys.exit(f'--device cuda needs 2 GPUs, found {torch.cuda.device_count()}')
    checks = set(args.checks)
    budget = Budget(args.budget_s)
    signal.signal(signal.SIGTERM, _kill_running_and_exit)  # e.g. `timeout` around this script
    n, half = args.iters, args.iters // 2
    wd = {name: osp.join(args.work_dir, name) for name in ('ddp', 'single', 'guard', 'resume')}
    runs, results = {}, {}
    print(f'{args.config}: {args.device} / {args.backend}, N = {n}', flush=True)

    def go(name, world_size, work_dir, resume=False, **derive):
        if not resume:
            import shutil
            shutil.rmtree(work_dir, ignore_errors=True)
        cfg_path = derive_config(args, name, work_dir, **derive)
        runs[name] = launch(args, name, world_size, cfg_path, work_dir, budget, resume=resume)

    if checks & {'launch', 'equivalence', 'resume', 'throughput'}:
        go('ddp', 2, wd['ddp'], max_iters=n)
    if checks & {'equivalence', 'throughput'}:
        go('single', 1, wd['single'], max_iters=2 * n, accumulate=2, extra_options=args.reference_cfg_options)
    if 'guard' in checks:
        go('guard', 2, wd['guard'], max_iters=args.guard_iters,
           inject=dict(loss_iters=[args.nan_iter - 1], ranks=[1]))  # the wrapper counts iterations from 0
    if 'resume' in checks:
        go('stop', 2, wd['resume'], max_iters=n, signal_after=half)
        stop_ckpts = glob.glob(osp.join(wd['resume'], 'iter_*.pth'))
        if runs['stop'].get('rc') == 0:
            go('resume', 2, wd['resume'], resume=True, max_iters=n)

    def recs(name, world_size):
        return read_records(wd['resume' if name in ('stop', 'resume') else name], name, world_size)

    def weights(name, it):
        path = osp.join(wd[name], f'iter_{it}.pth')
        return load_weights(path) if osp.exists(path) else None

    init_path = osp.join(wd['ddp'], 'init_weights.pth')
    init_w = torch.load(init_path, map_location='cpu', weights_only=True) if osp.exists(init_path) else None
    ddp_w = weights('ddp', n) if 'ddp' in runs else None
    if 'launch' in checks:
        results['launch'] = verdict_launch(runs['ddp'], recs('ddp', 2), n,
                                           glob.glob(osp.join(wd['ddp'], 'iter_*.pth')),
                                           logged_iterations(wd['ddp']))
    if 'equivalence' in checks:
        results['equivalence'] = verdict_equivalence(
            recs('ddp', 2), recs('single', 1), ddp_w, weights('single', 2 * n), init_w, runs['ddp'], runs['single'],
            n, args.loss_rtol, args.weight_rtol)
    if 'guard' in checks:
        results['guard'] = verdict_guard(runs['guard'], recs('guard', 2), args.guard_iters, args.nan_iter)
    if 'resume' in checks:
        results['resume'] = verdict_resume(
            runs['stop'], runs.get('resume', dict(name='resume', skipped='the stop run failed')), recs('stop', 2),
            recs('resume', 2), recs('ddp', 2), half, n, stop_ckpts,
            weights('resume', n) if 'resume' in runs else None, ddp_w, init_w, args.weight_rtol, args.loss_rtol)
    if 'throughput' in checks:
        one = throughput(recs('single', 1), 2 * args.warmup_iters, 1)
        two = throughput(recs('ddp', 2), args.warmup_iters, 2)
        results['throughput'] = dict(
            one=one, two=two, batch_per_process=1, warmup_iters=args.warmup_iters,
            scaling_efficiency=two['images_per_s'] / (2 * one['images_per_s']) if one and two else None,
            note='time per iteration as the training log computes it (mmengine train/time, rank 0), including '
                 "this check's per-iteration hooks; the 1-process run accumulates 2 iterations per update")
    needs = dict(launch=['ddp'], equivalence=['ddp', 'single'], guard=['guard'], resume=['ddp', 'stop', 'resume'])
    for check, names in needs.items():
        skipped = [runs[name]['skipped'] for name in names if name in runs and runs[name].get('skipped')]
        if check in results and skipped:  # not run (out of time) is not a failure: no verdict
            results[check].update(passed=None, problems=[f'not run: {skipped[0]}'])
    start = next((r['start'] for r in recs('ddp', 2) if r['start']), None) or {}
    report = dict(config=osp.relpath(args.config, REPO_ROOT) if args.config.startswith(REPO_ROOT) else args.config,
                  device=args.device, backend=args.backend, card=start.get('card'), torch=start.get('torch'),
                  iters=n, argv=sys.argv[1:] if argv is None else list(argv),
                  passed=bool(results) and all(r.get('passed', True) is True for r in results.values()),
                  checks=results, runs=runs)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1, default=str)
    print_table(report)
    return report


def logged_iterations(work_dir: str) -> list:
    """Iterations with a loss in rank 0's training log (vis_data/scalars.json)."""
    its = []
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')):
        with open(path) as f:
            its += [json.loads(line)['iter'] for line in f if line.strip() and '"loss"' in line]
    return its


RESULT = {True: 'PASS', False: 'FAIL', None: 'SKIP'}


def _fmt(x) -> str:
    return '-' if x is None else f'{x:.3g}'


def print_table(report: dict) -> None:
    checks = report['checks']
    print(f"\n{report['config']} on {report['card'] or report['device']} ({report['backend']}), N = {report['iters']}")
    print(f"{'check':<12} {'result':<6} detail")
    for name, r in checks.items():
        if name == 'throughput':
            one, two = r['one'] or {}, r['two'] or {}
            eff = r['scaling_efficiency']
            print(f"{name:<12} {'-':<6} 1 process {_fmt(one.get('images_per_s'))} img/s, 2 processes "
                  f"{_fmt(two.get('images_per_s'))} img/s, efficiency {'-' if eff is None else f'{eff:.0%}'}")
            continue
        if name == 'launch':
            detail = f"{r['world_size']} ranks ({r['backend']}), checkpoints {r['checkpoints']}"
        elif name == 'equivalence':
            lo, w = r['losses'], r['weights'] or {}
            detail = (f"{r['samples_compared']} per-sample losses: max abs {_fmt(lo['max_abs'])}, rel "
                      f"{_fmt(lo['max_rel'])}; weights max abs {_fmt(w.get('max_abs'))}, drift {_fmt(w.get('drift'))}")
        elif name == 'guard':
            skips = [p and p['skips_total'] for p in r['per_rank']]
            detail = f"NaN on rank {r['nan_rank']} at iter {r['nan_iter']}: skip counters {skips}"
        else:
            lo, w = r['losses'], r['weights'] or {}
            detail = (f"stopped at {r['stopped_at']}: losses max rel {_fmt(lo['max_rel'])}, weights max abs "
                      f"{_fmt(w.get('max_abs'))}, drift {_fmt(w.get('drift'))}")
        print(f"{name:<12} {RESULT[r['passed']]:<6} {detail}")
        for problem in r['problems'][:3]:
            print(f"{'':<19} {problem}")
    print(f"{'all':<12} {'PASS' if report['passed'] else 'FAIL'}")


if __name__ == '__main__':
    sys.exit(0 if main()['passed'] else 1)

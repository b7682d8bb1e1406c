"""Two processes of one config through ``tools/dist_train.sh``: runs, equals one process, guards, resumes, scales.

    python benchmarks/benchmark_ddp.py [CONFIG] --device cuda|cpu [--iters 30] [--out ddp.json] \
        [--cfg-options model.backbone.init_cfg=None ...]

CONFIG defaults to ``configs/shapes1024/vim_zoh.py``. Every run is the real tool (``tools/dist_train.sh CONFIG 2``
or ``tools/train.py`` for one process) on a config derived from CONFIG and dumped into its work dir: batch 1 per
process, the sampler's seed fixed, a constant learning rate (the config's base lr: a warm-up would leave the
weights almost where they started and make every comparison trivially equal), no validation, a log line per
iteration and one checkpoint at the end. Three test-side hooks (below; the training processes import this file
through ``custom_imports``) write one JSON line per rank and iteration (losses, image ids, the guard's skip
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
             every other iteration), both ranks' skip counters 1 with ``loss_ranks == [1]``, the run finishes.
resume       ``stop``: 2 ranks, SIGUSR1 to rank 1 after iteration N/2 (the PreemptionHook checkpoints at the
             boundary both ranks agree on and stops); ``resume``: ``--resume`` to N. Its final weights and its
             losses of iterations N/2+1..N against ``ddp``'s.
throughput   images/s on 1 process (``single``) and 2 (``ddp``), from the training log's time per iteration
             (mmengine's ``train/time``) after ``--warmup-iters``; scaling efficiency = ips_2 / (2 ips_1). At batch
             1 per GPU; ``single``'s iterations alternate backward-only and backward+step (accumulation).

Every wait has a timeout (each run: ``--run-timeout``, all together: ``--budget-s``; a run that exceeds it is
killed with its process group and reported as hung); collectives get ``env_cfg.dist_cfg.timeout``. NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1). Writes one
JSON (``--out``) and prints a table last. ``--reference-cfg-options`` changes the ``single`` run only (a negative
control: e.g. another sampler seed must fail the equivalence).
"""
import argparse
import glob
import hashlib
import json
import math
import os
import os.path as osp
import random
import signal
import socket
import subprocess
import sys
import time

from _bootstrap import setup_repo_path

REPO_ROOT = setup_repo_path()
BENCH_DIR = osp.dirname(osp.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.dist import get_dist_info  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import is_model_wrapper  # noqa: E402

from mmdet.registry import HOOKS  # noqa: E402
from projects.vim_disc.engine.optim_wrapper import SKIPS_TOTAL  # noqa: E402

DEFAULT_CONFIG = 'configs/shapes1024/vim_zoh.py'
MODULE = 'benchmark_ddp'  # how the training processes import this file (benchmarks/ on their PYTHONPATH)
NO_MULTICAST = dict(NCCL_NVLS_ENABLE='0', TORCH_SYMM_MEM_DISABLE_MULTICAST='1', NVSHMEM_DISABLE_NVLS='1')


# ---------------------------------------------------------------------------------------------------
# Test-side hooks (run inside the training processes)
# ---------------------------------------------------------------------------------------------------
def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def weight_fingerprint(model) -> tuple:
    """(digest, norm) of all parameters: per-tensor norms in one multi-tensor launch, hashed.

    Equal digests: the same weights (an update moves some norm); cheap enough for every iteration.
    """
    params = [p.detach() for p in _unwrap(model).parameters()]
    norms = torch.stack(torch._foreach_norm(params)).double().cpu()
    return hashlib.sha1(norms.numpy().tobytes()).hexdigest()[:16], float(norms.square().sum().sqrt())


def _sample_ids(data_batch) -> list:
    samples = data_batch.get('data_samples', []) if isinstance(data_batch, dict) else []
    ids = []
    for s in samples:
        meta = getattr(s, 'metainfo', {})
        ids.append(meta.get('img_id', meta.get('img_path', meta.get('sample_idx'))))
    return ids


@HOOKS.register_module(force=True)
class DDPCheckRecordHook(Hook):
    """One JSON line per rank and iteration into ``path.format(rank=...)``; rank 0 saves the initial weights."""

    priority = 'LOWEST'

    def __init__(self, path: str, save_init: str = ''):
        self.path = path
        self.save_init = save_init
        self._file = None

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + '\n')
        self._file.flush()

    def before_train(self, runner) -> None:
        rank, world_size = get_dist_info()
        self._file = open(self.path.format(rank=rank), 'a')
        model = _unwrap(runner.model)
        device = next(model.parameters()).device
        ow = runner.optim_wrapper
        digest, norm = weight_fingerprint(model)
        self._write(dict(
            event='start', rank=rank, world_size=world_size, iter=runner.iter, device=str(device),
            card=torch.cuda.get_device_name(device) if device.type == 'cuda' else None, torch=torch.__version__,
            backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            wrapper=type(runner.model).__name__, optim_wrapper=type(ow).__name__,
            amp_dtype=str(getattr(ow, 'cast_dtype', None)), accumulate=getattr(ow, '_accumulative_counts', 1),
            fingerprint=digest, norm=norm))
        if self.save_init and rank == 0 and runner.iter == 0:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, self.save_init)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        hub, ow = runner.message_hub, runner.optim_wrapper
        digest, norm = weight_fingerprint(runner.model)
        row = dict(event='iter', iter=runner.iter + 1, ids=_sample_ids(data_batch),
                   losses={k: float(v) for k, v in (outputs or {}).items()},
                   time=hub.get_scalar('train/time').current() if 'train/time' in hub.log_scalars else None,
                   data_time=(hub.get_scalar('train/data_time').current()
                              if 'train/data_time' in hub.log_scalars else None),
                   skips=hub.get_info(SKIPS_TOTAL), skipped=getattr(ow, 'last_step_skipped', None),
                   last_skip=getattr(ow, 'last_skip', None), fingerprint=digest, norm=norm)
        self._write(row)

    def after_train(self, runner) -> None:
        graphs = None
        backbone = getattr(_unwrap(runner.model), 'backbone', None)
        if getattr(backbone, 'cuda_graph', False):
            from projects.vim_disc.models.cuda_graph import cuda_graph_state
            st = cuda_graph_state(backbone)
            graphs = dict(captures=st.captures, replays=st.replays, eager_calls=st.eager_calls, disabled=st.disabled)
        self._write(dict(event='end', iter=runner.iter, cuda_graph=graphs))
        self._file.close()


@HOOKS.register_module(force=True)
class DDPCheckSeedHook(Hook):
    """At every iteration boundary, seed random / numpy / torch (CPU and CUDA) from the stream position of the
    iteration's first sample on this rank (``rank + iter * world_size * batch_size``, the sampler's sharding).

    Runs last (after the RNG restore of a resume and before the next batch is loaded), so that a sample's
    augmentation in the main process and the model's draws (RoI samplers, DropPath) depend on the sample alone,
    not on how many samples this process saw before: what makes 2 x 1 comparable with 1 x 2.
    """

    priority = 'LOWEST'

    def __init__(self, seed: int = 0, batch_size: int = 1):
        self.seed = seed
        self.batch_size = batch_size

    def _seed_for(self, it: int) -> None:
        from projects.vim_disc.engine.sampler import stream_sample_seed
        rank, world_size = get_dist_info()
        s = stream_sample_seed(self.seed, rank + it * world_size * self.batch_size)
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        torch.manual_seed(s)  # every CUDA device too

    def before_train(self, runner) -> None:
        self._seed_for(runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._seed_for(runner.iter + 1)


@HOOKS.register_module(force=True)
class DDPCheckSignalHook(Hook):
    """Send ``signum`` to this process on ``rank`` after iteration ``after_iter`` (1-based); priority VERY_LOW, so
    the PreemptionHook (LOWEST) of the same iteration already sees it and stops there."""

    priority = 'VERY_LOW'

    def __init__(self, rank: int = 1, after_iter: int = 1, signum: int = int(signal.SIGUSR1)):
        self.rank, self.after_iter, self.signum = rank, after_iter, signum

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.after_iter and get_dist_info()[0] == self.rank:
            os.kill(os.getpid(), self.signum)


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


_RUNNING = []  # the process group being waited for: killed with it when this script is terminated


def _kill_running_and_exit(signum, frame):
    for proc in _RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


class Budget:
    def __init__(self, total_s):
        self.end = None if total_s is None else time.monotonic() + total_s

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def launch(args, name: str, world_size: int, cfg_path: str, work_dir: str, budget: Budget,
           resume: bool = False) -> dict:
    """Run the tool; every wait bounded: a run past its timeout is killed with its whole process group."""
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
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun, both ranks and their dataloader workers
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


def compare_weights(a: dict, b: dict, init: dict = None) -> dict:
    """max |a - b|, that over max |b|, and the drift |a - b| / |b - init| (L2 over all floating tensors)."""
    keys = [k for k in b if torch.is_floating_point(b[k])]
    if sorted(keys) != sorted(k for k in a if torch.is_floating_point(a[k])):
        return dict(same_keys=False)
    diff2 = move2 = 0.0
    max_abs = max_ref = 0.0
    for k in keys:
        d = (a[k].double() - b[k].double())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
        max_ref = max(max_ref, float(b[k].double().abs().max()) if d.numel() else 0.0)
        diff2 += float(d.square().sum())
        if init is not None:
            move2 += float((b[k].double() - init[k].double()).square().sum())
    out = dict(same_keys=True, max_abs=max_abs, max_rel=max_abs / max_ref if max_ref else math.inf)
    if init is not None:
        out['movement'] = math.sqrt(move2)
        out['drift'] = math.sqrt(diff2) / math.sqrt(move2) if move2 else math.inf
    return out


def compare_losses(pairs) -> dict:
    """pairs: (iteration, a, b) total losses; max abs, max rel (|a - b| / |b|) and the max rel per iteration."""
    if not pairs:
        return dict(n=0, max_abs=None, max_rel=None, max_rel_by_iter={})
    rel = [(i, 0.0 if a == b else abs(a - b) / abs(b) if b and math.isfinite(a - b) else math.inf)
           for i, a, b in pairs]
    by_iter = {}
    for i, r in rel:
        by_iter[i] = max(by_iter.get(i, 0.0), r)
    abs_d = [abs(a - b) if math.isfinite(a - b) else math.inf for _, a, b in pairs]
    return dict(n=len(pairs), max_abs=max(abs_d), max_rel=max(r for _, r in rel),
                all_finite=all(math.isfinite(a) and math.isfinite(b) for _, a, b in pairs),
                max_rel_by_iter=by_iter)


# ---------------------------------------------------------------------------------------------------
# Verdicts: pure functions of records, checkpoints and run results (tested on mutated inputs)
# ---------------------------------------------------------------------------------------------------
def _failed_run(run) -> str:
    if run is None:
        return 'not run'
    if run.get('skipped'):
        return run['skipped']
    if run.get('hung'):
        return f"{run['name']} hung: killed after {run['timeout_s']:.0f} s"
    if run.get('rc') != 0:
        return f"{run['name']} exited with {run['rc']} (see {run.get('log')})"
    return ''


def _replicas_equal(recs) -> list:
    """Iterations at which the ranks' weight fingerprints differ."""
    its = sorted(set.intersection(*(set(r['iters']) for r in recs)))
    return [i for i in its if len({r['iters'][i]['fingerprint'] for r in recs}) > 1]


def verdict_launch(run, recs, iters: int, checkpoints: list, logged_iters: list) -> dict:
    problems = []
    why = _failed_run(run)
    if why:
        problems.append(why)
    for r, rec in enumerate(recs):
        missing = [i for i in range(1, iters + 1) if i not in rec['iters']]
        if missing:
            problems.append(f'rank {r} recorded no iteration {missing[:5]}')
        bad = [i for i, row in rec['iters'].items() if not math.isfinite(row['losses'].get('loss', math.nan))]
        if bad:
            problems.append(f'rank {r}: non-finite loss at iterations {bad[:5]}')
        if rec['end'] is None:
            problems.append(f'rank {r} did not finish')
    if sorted(logged_iters) != list(range(1, iters + 1)):
        problems.append(f"rank 0's log has iterations {sorted(logged_iters)[:3]}..., not 1..{iters}")
    names = sorted(osp.basename(c) for c in checkpoints)
    if names != [f'iter_{iters}.pth']:
        problems.append(f'checkpoints {names}, expected exactly iter_{iters}.pth')
    apart = _replicas_equal(recs) if all(rec['iters'] for rec in recs) else []
    if apart:
        problems.append(f'the replicas differ after iterations {apart[:5]}')
    start = recs[0]['start'] or {}
    return dict(passed=not problems, problems=problems, checkpoints=names, world_size=start.get('world_size'),
                backend=start.get('backend'), wrapper=start.get('wrapper'), amp_dtype=start.get('amp_dtype'),
                device=start.get('device'), cuda_graph=[(rec['end'] or {}).get('cuda_graph') for rec in recs],
                iters_recorded=[len(rec['iters']) for rec in recs])


def verdict_equivalence(ddp_recs, single_recs, ddp_w: dict, single_w: dict, init_w: dict, ddp_run, single_run,
                        iters: int, loss_rtol: float, weight_rtol: float) -> dict:
    """ddp rank r, iteration i (1-based) <-> single iteration 2(i - 1) + r + 1."""
    problems = [p for p in (_failed_run(ddp_run), _failed_run(single_run)) if p]
    pairs, id_mismatch, per_term = [], [], {}
    for i in range(1, iters + 1):
        for r, rec in enumerate(ddp_recs):
            a, b = rec['iters'].get(i), single_recs[0]['iters'].get(2 * (i - 1) + r + 1)
            if a is None or b is None:
                continue
            if a['ids'] != b['ids']:
                id_mismatch.append((i, r, a['ids'], b['ids']))
            pairs.append((i, a['losses']['loss'], b['losses']['loss']))
            for k, v in a['losses'].items():
                if k in b['losses']:
                    per_term[k] = max(per_term.get(k, 0.0), abs(v - b['losses'][k]))
    if not problems and len(pairs) != 2 * iters:
        problems.append(f'{len(pairs)} of {2 * iters} per-sample losses recorded')
    if id_mismatch:
        i, r, a, b = id_mismatch[0]
        problems.append(f'different samples: ddp rank {r} iter {i} saw {a}, single iter {2 * (i - 1) + r + 1} '
                        f'saw {b} ({len(id_mismatch)} mismatches)')
    start_d, start_s = ddp_recs[0]['start'] or {}, single_recs[0]['start'] or {}
    same_init = start_d.get('fingerprint') is not None and start_d.get('fingerprint') == start_s.get('fingerprint')
    if not same_init and not problems:
        problems.append('different initial weights')
    losses = compare_losses(pairs)
    if losses['n'] and not losses['max_rel'] <= loss_rtol:
        problems.append(f"per-sample losses differ by up to {losses['max_rel']:.3g} (rel) > {loss_rtol:g}")
    weights = compare_weights(ddp_w, single_w, init_w) if ddp_w is not None and single_w is not None else None
    if weights is None:
        if not problems:
            problems.append('final weights missing')
    elif not weights.get('same_keys'):
        problems.append('the two final checkpoints hold different parameters')
    elif not weights['drift'] <= weight_rtol:
        problems.append(f"final weights drift {weights['drift']:.3g} of the training movement > {weight_rtol:g}")
    return dict(passed=not problems, problems=problems, same_initial_weights=same_init, losses=losses,
                max_abs_per_loss_term=per_term, weights=weights, loss_rtol=loss_rtol, weight_rtol=weight_rtol,
                samples_compared=len(pairs), sample_id_mismatches=len(id_mismatch))


def verdict_guard(run, recs, iters: int, nan_iter: int, nan_rank: int = 1) -> dict:
    problems = []
    why = _failed_run(run)
    if why:
        problems.append(why)
    per_rank = []
    for r, rec in enumerate(recs):
        its = rec['iters']
        if sorted(its) != list(range(1, iters + 1)):
            problems.append(f'rank {r} recorded iterations {sorted(its)[:3]}..., not 1..{iters}')
            per_rank.append(None)
            continue
        prev = {i: (its[i - 1]['fingerprint'] if i > 1 else rec['start']['fingerprint']) for i in its}
        unchanged = [i for i in its if its[i]['fingerprint'] == prev[i]]
        skipped = [i for i in its if its[i]['skipped']]
        last = its[iters]
        info = dict(skips_total=last['skips'], skipped_iters=skipped, unchanged_iters=unchanged,
                    last_skip=its[nan_iter].get('last_skip'))
        per_rank.append(info)
        if unchanged != [nan_iter]:
            problems.append(f'rank {r}: weights unchanged at iterations {unchanged}, expected exactly [{nan_iter}]')
        if skipped != [nan_iter]:
            problems.append(f'rank {r}: skipped updates at {skipped}, expected [{nan_iter}]')
        if last['skips'] != 1:
            problems.append(f"rank {r}: skip counter {last['skips']}, expected 1")
        loss_ranks = (info['last_skip'] or {}).get('loss_ranks')
        if loss_ranks != [nan_rank]:
            problems.append(f'rank {r}: the skip names loss ranks {loss_ranks}, expected [{nan_rank}]')
        after = [i for i in its if i > nan_iter and not math.isfinite(its[i]['losses'].get('loss', math.nan))]
        if after:
            problems.append(f'rank {r}: non-finite losses after the skip at {after}')
    if all(per_rank) and len({p['skips_total'] for p in per_rank}) > 1:
        problems.append(f"skip counters disagree across ranks: {[p['skips_total'] for p in per_rank]}")
    if all(rec['iters'] for rec in recs):
        apart = _replicas_equal(recs)
        if apart:
            problems.append(f'the replicas differ after iterations {apart[:5]}')
    return dict(passed=not problems, problems=problems, nan_iter=nan_iter, nan_rank=nan_rank, iters=iters,
                per_rank=per_rank)


def verdict_resume(stop_run, resume_run, stop_recs, resume_recs, ddp_recs, stop_at: int, iters: int,
                   stop_ckpts: list, resumed_w: dict, ddp_w: dict, init_w: dict, weight_rtol: float,
                   loss_rtol: float) -> dict:
    problems = [p for p in (_failed_run(stop_run), _failed_run(resume_run)) if p]
    for r, rec in enumerate(stop_recs):
        if rec['iters'] and max(rec['iters']) != stop_at:
            problems.append(f"rank {r} of the stopped run ended at iteration {max(rec['iters'])}, not {stop_at}")
    if f'iter_{stop_at}.pth' not in [osp.basename(c) for c in stop_ckpts]:
        problems.append(f'no checkpoint iter_{stop_at}.pth from the stop')
    pairs = []
    for r, rec in enumerate(resume_recs):
        if rec['start'] and rec['start']['iter'] != stop_at:
            problems.append(f"rank {r} resumed at iteration {rec['start']['iter']}, not {stop_at}")
        if sorted(rec['iters']) != list(range(stop_at + 1, iters + 1)):
            problems.append(f'rank {r} of the resumed run recorded {sorted(rec["iters"])[:3]}..., '
                            f'not {stop_at + 1}..{iters}')
        for i, row in rec['iters'].items():
            ref = ddp_recs[r]['iters'].get(i)
            if ref is not None:
                pairs.append((i, row['losses']['loss'], ref['losses']['loss']))
    losses = compare_losses(pairs)
    if losses['n'] and not losses['max_rel'] <= loss_rtol:
        problems.append(f"losses after the resume differ by up to {losses['max_rel']:.3g} (rel) > {loss_rtol:g}")
    weights = compare_weights(resumed_w, ddp_w, init_w) if resumed_w is not None and ddp_w is not None else None
    if weights is None:
        if not problems:
            problems.append('final weights missing')
    elif not weights.get('same_keys') or not weights['drift'] <= weight_rtol:
        problems.append(f"final weights drift {weights.get('drift')} of the training movement > {weight_rtol:g}")
    return dict(passed=not problems, problems=problems, stopped_at=stop_at, losses=losses, weights=weights,
                weight_rtol=weight_rtol, loss_rtol=loss_rtol)


def throughput(recs, warmup: int, world_size: int, batch_size: int = 1) -> dict:
    """images/s from the log's per-iteration time after ``warmup`` iterations (rank 0)."""
    times = [row['time'] for i, row in sorted(recs[0]['iters'].items()) if i > warmup and row['time'] is not None]
    if not times:
        return None
    return dict(iters=len(times), s_per_iter_median=float(np.median(times)), s_per_iter_mean=float(np.mean(times)),
                images_per_s=world_size * batch_size * len(times) / sum(times))


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

"""Hooks that keep long runs alive and explain them when they die.

* ``RNGStateHook``: carries the Python / numpy / torch RNG states through checkpoints, so a resumed run
  draws the same random numbers as an uninterrupted one (mmengine restores only the seed).
* ``NonFiniteRollbackHook``: after K consecutive updates skipped by the guarded optimizer wrapper, rolls
  back to the last good checkpoint with the learning rate scaled by ``lr_factor``; after M rollbacks stops
  with an error naming the iteration, the loss terms and the out-of-range SSM layers.
* ``SSMStatsHook``: every N iterations, per backbone layer and scan direction, the statistics of the
  discretized SSM: delta mean / p99 / max, min z = delta A, max |Abar(z)|, the fraction of z beyond the
  rule's stability bound ``z_stable``, and the gradient norms of A_log, D, dt_proj and x_proj.
* ``PreemptionHook``: on SIGUSR1 / SIGTERM (SLURM's warning before a time limit or preemption), at the
  next iteration boundary on which all ranks agree: checkpoint, ``last_checkpoint``, ``scontrol requeue``,
  clean stop. ``--resume`` on restart continues from that iteration.
"""
import logging
import math
import os
import os.path as osp
import signal
import subprocess
import threading
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.dist import all_gather_object, all_reduce, barrier, get_dist_info, is_distributed, is_main_process
from mmengine.hooks import CheckpointHook, Hook, IterTimerHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from mmdet.registry import HOOKS
from .checkpoint import (capture_rng_state, install_safe_checkpoint_loading, load_checkpoint_safely,
                         restore_rng_state, write_text_atomically)
from .optim_wrapper import CONSECUTIVE_SKIPS

# ---------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save every RNG state with each checkpoint; restore it when the run resumes.

    Periodic checkpoints are written by rank 0 alone, so they hold rank 0's state; the preemption
    checkpoint gathers all ranks' states. On resume each rank restores its own state when the checkpoint
    has it (rank 0 always does); other ranks keep their freshly seeded generators. The restore happens in
    ``before_train`` (priority LOWEST: after every other hook's set-up), after mmengine's own re-seeding.
    """

    priority = 'LOWEST'

    def __init__(self):
        self._pending: Optional[List[dict]] = None
        self._gathered: Optional[List[dict]] = None

    def before_run(self, runner) -> None:
        install_safe_checkpoint_loading()  # numpy's RNG state is an array: allow-listed there

    def gather_for_next_save(self) -> None:
        """Collective: every rank must call it; the next checkpoint then holds all ranks' states."""
        self._gathered = all_gather_object(capture_rng_state()) if is_distributed() else [capture_rng_state()]

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        states = self._gathered if self._gathered is not None else [capture_rng_state()]
        self._gathered = None
        checkpoint['rng_state'] = dict(ranks=states)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if getattr(runner, '_resume', False) and 'rng_state' in checkpoint:
            self._pending = checkpoint['rng_state']['ranks']

    def before_train(self, runner) -> None:
        if self._pending is None:
            return
        rank = get_dist_info()[0]
        if rank < len(self._pending):
            restore_rng_state(self._pending[rank])
            print_log(f'restored the RNG state saved at iter {runner.iter}', logger='current')
        self._pending = None


# ---------------------------------------------------------------------------------------------------
# Non-finite rollback
# ---------------------------------------------------------------------------------------------------
ROLLBACKS = 'nonfinite_rollbacks'
LR_SCALE = 'nonfinite_lr_scale'
LAST_GOOD_CKPT = 'nonfinite_last_good_ckpt'


class NonFiniteTrainingError(RuntimeError):
    """Training kept producing non-finite updates after every allowed rollback."""


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _find_hook(runner, cls):
    return next((h for h in runner.hooks if isinstance(h, cls)), None)


@HOOKS.register_module()
class NonFiniteRollbackHook(Hook):
    """Roll back after ``max_consecutive_skips`` skipped updates; give up after ``max_rollbacks``.

    Needs ``GuardedOptimWrapper`` / ``GuardedAmpOptimWrapper`` (they count the skips). The rollback target
    is the newest checkpoint written while no skip streak was running. Model, optimizer (and loss scaler)
    and parameter schedulers come back from it, the learning rate is multiplied by
    ``lr_factor ** rollbacks`` in total, and the iteration counter returns to the checkpoint's. The data
    stream is NOT rewound: training continues on batches it has not seen, so a bad batch is not replayed.
    Counts and the lr scale live in the message hub and survive a resume.

    Args:
        max_consecutive_skips (int): K, skipped updates in a row that trigger a rollback.
        lr_factor (float): multiplies the learning rate at each rollback.
        max_rollbacks (int): M; the (M+1)-th trigger raises :class:`NonFiniteTrainingError`.
    """

    priority = 'LOWEST'  # after ParamSchedulerHook and CheckpointHook of the same iteration

    def __init__(self, max_consecutive_skips: int = 10, lr_factor: float = 0.5, max_rollbacks: int = 3):
        assert max_consecutive_skips >= 1 and max_rollbacks >= 0 and 0 < lr_factor
        self.max_consecutive_skips = max_consecutive_skips
        self.lr_factor = lr_factor
        self.max_rollbacks = max_rollbacks
        self.rollbacks = 0
        self.good_ckpt: Optional[str] = None
        self._seen_ckpt: Optional[str] = None

    def before_run(self, runner) -> None:
        install_safe_checkpoint_loading()  # rollbacks read checkpoints with weights_only=True

    def before_train(self, runner) -> None:
        if not hasattr(runner.optim_wrapper, 'consecutive_skips'):
            raise TypeError('NonFiniteRollbackHook needs optim_wrapper type GuardedOptimWrapper or '
                            f'GuardedAmpOptimWrapper, got {type(runner.optim_wrapper).__name__}')
        hub = runner.message_hub
        # a run preempted in the middle of a skip streak continues the streak
        runner.optim_wrapper.consecutive_skips = int(hub.get_info(CONSECUTIVE_SKIPS, 0) or 0)
        self.rollbacks = int(hub.get_info(ROLLBACKS, 0) or 0)
        self.good_ckpt = hub.get_info(LAST_GOOD_CKPT, None)
        self._seen_ckpt = hub.get_info('last_ckpt', None)
        if self.good_ckpt is None and getattr(runner, '_resume', False) and runner.iter > 0:
            self.good_ckpt = self._seen_ckpt  # the checkpoint this run resumed from

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        wrapper = runner.optim_wrapper
        self._track_good_checkpoint(runner, wrapper.consecutive_skips)
        if wrapper.consecutive_skips:
            stats_hook = _find_hook(runner, SSMStatsHook)
            if stats_hook is not None:
                stats_hook.request()  # fresh SSM statistics while things go wrong
        if wrapper.consecutive_skips < self.max_consecutive_skips:
            return
        if self.rollbacks >= self.max_rollbacks:
            raise NonFiniteTrainingError(self._report(runner, outputs))
        if self.good_ckpt is None or not osp.isfile(self.good_ckpt):
            raise NonFiniteTrainingError(
                self._report(runner, outputs) + '\nno good checkpoint to roll back to '
                f'({self.good_ckpt!r}); save checkpoints more often than the failure horizon')
        self._rollback(runner)

    def _track_good_checkpoint(self, runner, consecutive_skips: int) -> None:
        last = runner.message_hub.get_info('last_ckpt', None)
        if last is not None and last != self._seen_ckpt:
            self._seen_ckpt = last
            if consecutive_skips == 0:
                self.good_ckpt = last
                runner.message_hub.update_info(LAST_GOOD_CKPT, last, resumed=True)

    def _rollback(self, runner) -> None:
        ckpt = load_checkpoint_safely(self.good_ckpt, map_location='cpu')
        failed_iter = runner.iter + 1
        _unwrap(runner.model).load_state_dict(ckpt['state_dict'])
        runner.optim_wrapper.load_state_dict(ckpt['optimizer'])
        schedulers = runner.param_schedulers or []
        saved = ckpt.get('param_schedulers', [])
        if isinstance(schedulers, dict):
            pairs = [(s, sd) for name in schedulers for s, sd in zip(schedulers[name], saved[name])]
        else:
            pairs = list(zip(schedulers, saved))
        for scheduler, state in pairs:
            scheduler.load_state_dict(state)

        self.rollbacks += 1
        ckpt_scale = ckpt['message_hub']['runtime_info'].get(LR_SCALE, 1.0)
        target_scale = self.lr_factor ** self.rollbacks
        _scale_lr(runner, target_scale / ckpt_scale, [s for s, _ in pairs])

        ckpt_iter = int(ckpt['meta']['iter'])
        runner.train_loop._iter = ckpt_iter - 1  # the loop adds 1 after this hook returns
        timer = _find_hook(runner, IterTimerHook)
        if timer is not None:  # its ETA averages over iterations since start_iter: start counting again
            timer.start_iter, timer.time_sec_tot = ckpt_iter, 0
        runner.optim_wrapper.initialize_count_status(runner.model, ckpt_iter, runner.max_iters)
        runner.optim_wrapper.reset_skip_streak()
        hub = runner.message_hub
        hub.update_info(ROLLBACKS, self.rollbacks, resumed=True)
        hub.update_info(LR_SCALE, target_scale, resumed=True)
        lrs = [g['lr'] for g in runner.optim_wrapper.optimizer.param_groups]
        print_log(
            f'rollback {self.rollbacks}/{self.max_rollbacks}: {self.max_consecutive_skips} consecutive '
            f'non-finite updates ending at iter {failed_iter}; restored {self.good_ckpt} (iter {ckpt_iter}); '
            f'learning rate x{target_scale:g} of the schedule (group 0 now {lrs[0]:.4g}); training continues '
            'from there on batches not seen before', logger='current', level=logging.WARNING)

    def _report(self, runner, outputs) -> str:
        wrapper = runner.optim_wrapper
        it = runner.iter + 1
        lines = [f'training diverged at iter {it}: {wrapper.consecutive_skips} consecutive non-finite updates '
                 f'after {self.rollbacks} rollback(s) (max {self.max_rollbacks}; learning rate x'
                 f'{self.lr_factor ** self.rollbacks:g} of the schedule).']
        if wrapper.last_skip:
            s = wrapper.last_skip
            lines.append(f"last skip: iter {s['iter'] + 1}, loss {s['loss']:.4g}, grad norm {s['grad_norm']:.4g}, "
                         f"non-finite loss on ranks {s['loss_ranks']}, gradient on ranks {s['grad_ranks']}")
        terms = []
        for name, value in (outputs or {}).items():
            v = float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)
            terms.append(f'{name}={v:.4g}' + ('' if math.isfinite(v) else ' (!)'))
        lines.append('loss terms: ' + (', '.join(terms) if terms else '(none reported)'))
        stats_hook = _find_hook(runner, SSMStatsHook)
        if stats_hook is None:
            lines.append('SSM statistics: no SSMStatsHook configured')
        else:
            bad = stats_hook.out_of_range()
            lines.append('SSM layers out of range: ' + ('; '.join(bad) if bad else 'none (last statistics at iter '
                                                                                  f'{stats_hook.last_iter})'))
        return '\n'.join(lines)


def _scale_lr(runner, factor: float, schedulers: Sequence) -> None:
    """Multiply the current and the base learning rate everywhere the schedulers read them."""
    if factor == 1.0:
        return
    for group in runner.optim_wrapper.optimizer.param_groups:
        group['lr'] *= factor
        if 'initial_lr' in group:
            group['initial_lr'] *= factor
    for scheduler in schedulers:
        if getattr(scheduler, 'param_name', None) != 'lr':
            continue
        scheduler.base_values = [v * factor for v in scheduler.base_values]
        if hasattr(scheduler, '_last_value'):
            scheduler._last_value = [v * factor for v in scheduler._last_value]


# ---------------------------------------------------------------------------------------------------
# SSM statistics
# ---------------------------------------------------------------------------------------------------
DIRECTIONS = ('fwd', 'bwd')
# per direction, the mixer attribute of each SSM parameter group
SSM_PARAMS = {
    'fwd': OrderedDict(A_log='A_log', D='D', dt_proj='dt_proj', x_proj='x_proj'),
    'bwd': OrderedDict(A_log='A_b_log', D='D_b', dt_proj='dt_proj_b', x_proj='x_proj_b'),
}
STATS = ('delta_mean', 'delta_p99', 'delta_max', 'z_min', 'abar_max', 'z_beyond')


@torch.no_grad()
def summarize_direction(delta: torch.Tensor, A: torch.Tensor, discretizer,
                        max_elements: int = 1 << 22) -> Dict[str, torch.Tensor]:
    """Statistics of one scan: delta (B, D, L), A (D, N) -> dict of 0-dim tensors (no host sync).

    z = delta * A is (B, D, L, N); it is formed ``max_elements`` at a time (blocks of channels) so the
    memory stays bounded. max |Abar| is taken at the z the kernel uses (after the rule's clamp, if any);
    ``z_beyond`` counts z below ``z_stable`` before the clamp (how often the clamp or instability bites).
    """
    delta = delta.float()
    A = A.float()
    B, D, L = delta.shape
    N = A.shape[-1]
    flat = delta.reshape(-1)
    if flat.numel() > (1 << 24):  # kthvalue on a strided sample beyond 16M values: p99 stays accurate
        flat = flat[::math.ceil(flat.numel() / (1 << 24))]
    k = max(1, math.ceil(0.99 * flat.numel()))
    # the k-th smallest, exactly. CUDA's kthvalue runs one slice in one thread block: ~20x slower than a full
    # sort (pytorch #75599), and it was most of a recording step's 0.8 s on the H200 (docs/performance.md)
    p99 = flat.sort().values[k - 1] if flat.is_cuda else flat.kthvalue(k).values
    out = dict(delta_mean=delta.mean(), delta_p99=p99, delta_max=delta.amax())
    z_stable = getattr(discretizer, 'z_stable', None)
    clamp = getattr(discretizer, 'clamp_z', None)
    z_min = torch.full((), math.inf, device=delta.device)
    abar_max = torch.zeros((), device=delta.device)
    beyond = torch.zeros((), device=delta.device)
    block = max(1, max_elements // max(1, B * L * N))
    for d0 in range(0, D, block):
        z = delta[:, d0:d0 + block, :, None] * A[None, d0:d0 + block, None, :]
        z_min = torch.minimum(z_min, z.amin())
        if z_stable is not None:
            beyond = beyond + (z < z_stable).sum()
        zk = clamp(z) if clamp is not None else z
        abar_max = torch.maximum(abar_max, discretizer.abar(zk).abs().amax().float())
    out.update(z_min=z_min, abar_max=abar_max, z_beyond=beyond / (B * D * L * N))
    return out


@HOOKS.register_module()
class SSMStatsHook(Hook):
    """Per-layer, per-direction SSM statistics every ``interval`` iterations.

    Mixers are found in the model as modules with ``record_stats`` and ``discretizer`` (Vim's
    ``BiMambaMixer``). On a statistics iteration the hook turns ``record_stats`` on; a forward hook on each
    mixer summarises its ``ssm_stats`` right away and drops them (so only one layer's delta is alive at a
    time), and gradient hooks on the SSM parameters take their norms as backward accumulates them (divided
    by the loss scale under AMP; under DDP these are the rank's local gradients).

    Everything goes into the message hub under ``ssm/<layer>/<dir>/<stat>`` (all layers; written to the
    visualizer, i.e. TensorBoard and scalars.json), plus network-wide extremes under ``train/ssm_*`` that
    appear in the regular text log line; a per-layer table is printed to the text log.

    Args:
        interval (int): N.
        delta_limit (float): delta above this counts as out of range (the kernels are accurate to
            delta ~ 1e3, docs/discretization.md).
        print_table (bool): print the per-layer table to the text log.
    """

    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL): the extremes land in this iteration's log line

    def __init__(self, interval: int = 50, delta_limit: float = 1e3, print_table: bool = True,
                 max_elements: int = 1 << 22):
        self.interval = interval
        self.delta_limit = delta_limit
        self.print_table = print_table
        self.max_elements = max_elements
        self.mixers: Dict[str, torch.nn.Module] = OrderedDict()
        self.latest: Dict[str, Dict[str, Dict[str, float]]] = {}
        self.last_iter: Optional[int] = None
        self._active = False
        self._requested = False
        self._current: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
        self._grad_sq: Dict[tuple, torch.Tensor] = {}
        self._grad_scale = 1.0
        self._handles = []

    def request(self) -> None:
        """Also record the next iteration (the rollback hook asks while updates are being skipped)."""
        self._requested = True

    # -- set-up ---------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        self.mixers = OrderedDict(
            (self._layer_name(name), m) for name, m in model.named_modules()
            if hasattr(m, 'record_stats') and hasattr(m, 'discretizer'))
        if not self.mixers:
            print_log('SSMStatsHook: the model has no SSM mixers with record_stats; nothing to record',
                      logger='current', level=logging.WARNING)
        for layer, mixer in self.mixers.items():
            self._handles.append(mixer.register_forward_hook(self._make_forward_hook(layer)))
            for direction in DIRECTIONS:
                for group, attr in SSM_PARAMS[direction].items():
                    owner = getattr(mixer, attr)
                    params = [owner] if isinstance(owner, torch.nn.Parameter) else list(owner.parameters())
                    for i, p in enumerate(params):
                        if p.requires_grad:
                            self._handles.append(p.register_post_accumulate_grad_hook(
                                self._make_grad_hook((layer, direction, group, i))))

    def after_train(self, runner) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _layer_name(module_name: str) -> str:
        name = module_name[len('backbone.'):] if module_name.startswith('backbone.') else module_name
        return name[:-len('.mixer')] if name.endswith('.mixer') else name

    def _make_forward_hook(self, layer: str):
        def hook(mixer, inputs, output):
            if not self._active or mixer.ssm_stats is None:
                return
            summary = {}
            for direction, s in mixer.ssm_stats.items():
                summary[direction] = summarize_direction(s['delta'], s['A'], mixer.discretizer, self.max_elements)
            self._current[layer] = summary
            mixer.ssm_stats = None  # free delta now, not at the end of the iteration
        return hook

    def _make_grad_hook(self, key: tuple):
        def hook(param):
            if self._active and param.grad is not None:
                self._grad_sq[key] = param.grad.detach().float().pow(2).sum()
        return hook

    # -- per iteration ------------------------------------------------------------------------------
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._active = bool(self.mixers) and (self.every_n_train_iters(runner, self.interval) or self._requested)
        self._requested = False
        for mixer in self.mixers.values():
            mixer.record_stats = self._active
        if self._active:
            self._current, self._grad_sq = {}, {}
            scaler = getattr(runner.optim_wrapper, 'loss_scaler', None)
            self._grad_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self._active:
            return
        self._active = False
        for mixer in self.mixers.values():
            mixer.record_stats = False
            mixer.ssm_stats = None
        stats = self._collect()
        self.latest, self.last_iter = stats, runner.iter + 1
        self._publish(runner, stats)

    def _collect(self) -> Dict[str, Dict[str, Dict[str, float]]]:
        grad_norms: Dict[tuple, float] = {}
        for (layer, direction, group, _), sq in self._grad_sq.items():
            grad_norms[(layer, direction, group)] = grad_norms.get((layer, direction, group), 0.0) + float(sq)
        stats = {}
        for layer, per_dir in self._current.items():
            stats[layer] = {}
            for direction, values in per_dir.items():
                row = {k: float(v) for k, v in values.items()}
                for group in SSM_PARAMS[direction]:
                    sq = grad_norms.get((layer, direction, group))
                    # None: no gradient reached the group (frozen, or backward skipped it)
                    row[f'grad_{group}'] = math.sqrt(sq) / self._grad_scale if sq is not None else None
                stats[layer][direction] = row
        return stats

    def _publish(self, runner, stats) -> None:
        hub = runner.message_hub
        scalars = {}
        for layer, per_dir in stats.items():
            for direction, row in per_dir.items():
                for k, v in row.items():
                    if v is not None:
                        scalars[f'ssm/{layer}/{direction}/{k}'] = v
        for k, v in scalars.items():
            hub.update_scalar(k, v)
        rows = [r for per_dir in stats.values() for r in per_dir.values()]
        if rows:
            extremes = dict(ssm_delta_max=max(r['delta_max'] for r in rows),
                            ssm_abar_max=max(r['abar_max'] for r in rows),
                            ssm_z_min=min(r['z_min'] for r in rows),
                            ssm_z_beyond=max(r['z_beyond'] for r in rows))
            for k, v in extremes.items():
                hub.update_scalar(f'train/{k}', v)
        runner.visualizer.add_scalars(scalars, step=runner.iter + 1)
        if self.print_table:
            print_log(self.format_table(stats, runner.iter + 1), logger='current')
        bad = self.out_of_range()
        if bad:
            print_log('SSM statistics out of range: ' + '; '.join(bad), logger='current', level=logging.WARNING)

    def format_table(self, stats, it: int) -> str:
        disc = next(iter(self.mixers.values())).discretizer if self.mixers else None
        head = (f'SSM statistics at iter {it} (rule {getattr(disc, "name", "?")}, '
                f'z_stable {getattr(disc, "z_stable", None)})\n'
                f'{"layer":<10}{"dir":<5}{"delta mean":>11}{"p99":>10}{"max":>10}{"min z":>11}{"max|Abar|":>11}'
                f'{"beyond":>9}{"|g| A_log":>11}{"D":>10}{"dt_proj":>10}{"x_proj":>10}')
        lines = [head]
        for layer, per_dir in stats.items():
            for direction, r in per_dir.items():
                r = {k: (float('nan') if v is None else v) for k, v in r.items()}
                lines.append(
                    f'{layer:<10}{direction:<5}{r["delta_mean"]:>11.3g}{r["delta_p99"]:>10.3g}{r["delta_max"]:>10.3g}'
                    f'{r["z_min"]:>11.3g}{r["abar_max"]:>11.4g}{r["z_beyond"]:>9.3g}{r["grad_A_log"]:>11.3g}'
                    f'{r["grad_D"]:>10.3g}{r["grad_dt_proj"]:>10.3g}{r["grad_x_proj"]:>10.3g}')
        return '\n'.join(lines)

    def out_of_range(self) -> List[str]:
        """What is out of range in the latest statistics, one entry per layer and direction.

        Forward statistics: non-finite values, max |Abar| > 1, z beyond the rule's stability bound, delta
        above ``delta_limit``. Non-finite gradient norms are listed per layer only when some layers still
        have finite ones; when all are non-finite (what a non-finite loss does) that is one entry.
        """
        bad, grad_bad, rows = [], [], 0
        for layer, per_dir in self.latest.items():
            for direction, r in per_dir.items():
                rows += 1
                forward = {k: v for k, v in r.items() if not k.startswith('grad_')}
                why = [f'{k} {v}' for k, v in forward.items() if not math.isfinite(v)]
                if math.isfinite(r['abar_max']) and r['abar_max'] > 1 + 1e-4:
                    why.append(f'max|Abar| {r["abar_max"]:.4g} > 1')
                if r['z_beyond'] > 0:
                    why.append(f'{100 * r["z_beyond"]:.3g}% of z beyond z_stable')
                if math.isfinite(r['delta_max']) and r['delta_max'] > self.delta_limit:
                    why.append(f'max delta {r["delta_max"]:.4g} > {self.delta_limit:g}')
                if why:
                    bad.append(f'{layer} {direction}: ' + ', '.join(why))
                grads = [k for k, v in r.items() if k.startswith('grad_') and v is not None and not math.isfinite(v)]
                if grads:
                    grad_bad.append(f'{layer} {direction}: non-finite ' + ', '.join(grads))
        if grad_bad and len(grad_bad) == rows:
            bad.append('SSM gradient norms non-finite in every layer')
        else:
            bad += grad_bad
        return bad


# ---------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------
class _Signals:
    received: Optional[int] = None
    at: Optional[float] = None
    previous: dict = {}  # signal -> the handler before ours


def _on_signal(signum, frame) -> None:
    # only record: the work happens at the next iteration boundary, outside the handler
    _Signals.received = signum
    _Signals.at = time.time()


def install_preemption_signal_handlers(signals: Sequence[str] = ('SIGUSR1', 'SIGTERM')) -> None:
    """Record SIGUSR1 / SIGTERM instead of dying. Idempotent; call as early as possible (tools/train.py)
    so a signal that arrives while the model is still being built is not fatal."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in signals:
        sig = getattr(signal, name)
        if sig not in _Signals.previous:
            _Signals.previous[sig] = signal.signal(sig, _on_signal)


def uninstall_preemption_signal_handlers() -> None:
    """Put back the handlers that were there before (a long-lived process, e.g. a test session)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in _Signals.previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _Signals.previous = {}
    _Signals.received = None


def preemption_signal() -> Optional[int]:
    return _Signals.received


@HOOKS.register_module()
class PreemptionHook(Hook):
    """Checkpoint, requeue and stop cleanly when SLURM (or anyone) sends SIGUSR1 / SIGTERM.

    Ranks receive the signal at different moments, so after every iteration the ranks agree (one
    all-reduce of a flag) and all act at the same boundary: the checkpoint (through the CheckpointHook,
    so rotation and ``last_checkpoint`` stay consistent; with every rank's RNG state) holds the optimizer,
    schedulers, loss scaler, message hub and RNG state of exactly this iteration. Then rank 0 runs
    ``scontrol requeue $SLURM_JOB_ID`` (under SLURM and with ``requeue=True``) and the loop stops; the
    process exits normally. The requeued job starts with ``--resume`` and continues from here.

    Args:
        signals (Sequence[str]): signals that mean "save and go".
        requeue (bool): requeue the SLURM job (no-op outside SLURM).
    """

    priority = 'LOWEST'

    def __init__(self, signals: Sequence[str] = ('SIGUSR1', 'SIGTERM'), requeue: bool = True):
        self.signals = tuple(signals)
        self.requeue = requeue
        self.preempted_at: Optional[int] = None

    def before_run(self, runner) -> None:
        install_preemption_signal_handlers(self.signals)
        install_safe_checkpoint_loading()  # the restart resumes with weights_only=True

    def after_run(self, runner) -> None:
        uninstall_preemption_signal_handlers()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self._all_ranks_agree():
            return
        signum = preemption_signal()
        name = signal.Signals(signum).name if signum else 'a signal on another rank'
        path = self._checkpoint(runner, name)
        barrier()  # the file is complete before anyone leaves or the job is requeued
        requeued = self._requeue() if is_main_process() else ''
        self.preempted_at = runner.iter + 1
        _Signals.received = None  # handled
        print_log(f'{name}: saved {path} at iter {runner.iter + 1}{requeued}; stopping', logger='current',
                  level=logging.WARNING)
        runner.train_loop.stop_training = True

    def _all_ranks_agree(self) -> bool:
        flag = torch.tensor([1 if preemption_signal() is not None else 0], dtype=torch.int32)
        if is_distributed():
            all_reduce(flag, op='max')
        return bool(flag.item())

    def _checkpoint(self, runner, reason: str) -> str:
        step = runner.iter + 1
        rng_hook = _find_hook(runner, RNGStateHook)
        if rng_hook is not None:
            rng_hook.gather_for_next_save()
        ckpt_hook = _find_hook(runner, CheckpointHook)
        meta = dict(preempted_by=reason)
        if ckpt_hook is not None and not ckpt_hook.by_epoch:
            filename = ckpt_hook.filename_tmpl.format(step)
            path = ckpt_hook.file_backend.join_path(ckpt_hook.out_dir, filename)
            if getattr(ckpt_hook, 'last_ckpt', None) != path:  # not already saved by the CheckpointHook this iteration
                # its own routine: rotation (max_keep_ckpts), message-hub bookkeeping, last_checkpoint
                ckpt_hook._save_checkpoint_with_step(runner, step, meta)
        else:
            filename = f'iter_{step}.pth'
            runner.save_checkpoint(runner.work_dir, filename, by_epoch=False, meta=meta)
            path = osp.join(runner.work_dir, filename)
        if is_main_process():
            write_text_atomically(osp.join(runner.work_dir, 'last_checkpoint'), path)
        return path

    def _requeue(self) -> str:
        job = os.environ.get('SLURM_JOB_ID')
        if not self.requeue or not job:
            return '; not under SLURM: restart with --resume to continue'
        if os.environ.get('SLURM_ARRAY_JOB_ID'):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            res = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f'; scontrol requeue {job} failed ({e}): resubmit to continue'
        if res.returncode != 0:
            return f'; scontrol requeue {job} failed ({res.stderr.strip()}): resubmit to continue'
        return f'; requeued SLURM job {job}'

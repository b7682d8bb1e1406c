"""Optimizer wrappers that never apply a non-finite update.

Before every parameter update the wrapper checks the loss and the total gradient norm. If either is
non-finite on ANY rank, every rank skips the update (one all-reduce of a tiny flag tensor decides, so DDP
ranks never disagree or hang), the gradients are zeroed, and the skip is counted and logged with the
iteration. Rolling back after many skips in a row is the job of ``NonFiniteRollbackHook`` (hooks.py),
which reads :attr:`consecutive_skips`.

Every update (applied or skipped) publishes the running totals as scalars: ``train/nonfinite_skipped_steps``
and, with AMP, ``train/amp_overflow_skipped_steps`` (and the current ``train/loss_scale``). Cumulative on
purpose: mmengine's ``LogProcessor`` logs a key that does not match its ``mean_pattern`` (loss, time,
grad_norm) with its value at the logged iteration only, so a per-step 0/1 flag would log one sample, while a
count read at any logged iteration is exact. The totals live in the message hub's runtime info, which
checkpoints save, so they continue across a resume and a rollback.

With fp16 AMP (``GuardedAmpOptimWrapper``) two kinds of skip exist and are counted apart:

* a *guard skip*: the (unscaled) loss itself is non-finite; the loss scale is left alone, since a smaller
  scale cannot fix a forward pass that overflowed;
* an *AMP overflow*: the loss is finite but the scaled gradients overflowed; GradScaler's usual back-off
  happens. Only when the scale falls below ``min_loss_scale`` (gradients overflow even unscaled) does an
  overflow also count as a guard skip.

Clipping (``clip_grad``) is applied after the check, reusing the norm the check computed.

Test-only switch ``inject_nonfinite=dict(loss_iters=[...], grad_iters=[...], ranks=None, once=False)`` makes
the loss (NaN) or one gradient element (inf, after backward: this rank's gradients only) non-finite at the
given iterations, on the given ranks (None: all).
"""
import logging
from typing import Dict, Optional, Sequence

import torch
from mmengine.dist import all_reduce, get_dist_info, is_distributed
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from mmdet.registry import OPTIM_WRAPPERS

# message hub keys (runtime info is saved in checkpoints, so totals survive a resume)
SKIPS_TOTAL = 'nonfinite_skips_total'
CONSECUTIVE_SKIPS = 'nonfinite_consecutive_skips'
AMP_OVERFLOWS_TOTAL = 'amp_overflow_skips_total'
# the same totals as logged scalars, published at every update (see the module docstring)
SKIPPED_STEPS = 'train/nonfinite_skipped_steps'
AMP_OVERFLOW_STEPS = 'train/amp_overflow_skipped_steps'


class _NonFiniteGuard:
    """The check shared by the plain and the AMP wrapper (a mixin in front of mmengine's class)."""

    def _init_guard(self, inject_nonfinite: Optional[dict]) -> None:
        self.consecutive_skips = 0
        self.last_step_skipped = False
        self.last_skip: Optional[dict] = None
        self._loss_ok: Optional[torch.Tensor] = None  # AND over the micro-batches of one update
        self._last_loss = torch.zeros(())
        self._inject = _Injection(**inject_nonfinite) if inject_nonfinite else None

    # -- the loss ---------------------------------------------------------------------------------
    def update_params(self, loss: torch.Tensor, step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> None:
        if self._inject is not None and self._inject.hits(self._inject.loss_iters, self._iter()):
            loss = loss * float('nan')  # keeps the graph: backward runs as usual and yields NaN gradients
        self._remember_loss(loss)
        super().update_params(loss, step_kwargs, zero_kwargs)

    def _remember_loss(self, loss: torch.Tensor) -> None:
        # update_params sees the loss before any loss scaling: with AMP too, this is the true loss
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok
        self._last_loss = loss.detach()

    # -- the decision -----------------------------------------------------------------------------
    def _grads_and_norm(self):
        params = [p for group in self.optimizer.param_groups for p in group['params']
                  if p.requires_grad and p.grad is not None]
        if self._inject is not None and params and self._inject.hits(self._inject.grad_iters, self._iter()):
            params[0].grad.view(-1)[0] = float('inf')
        norm_type = 2.0
        if self.clip_grad_kwargs and self.grad_name == 'grad_norm':
            norm_type = float(self.clip_grad_kwargs.get('norm_type', 2.0))
        if not params:
            return params, torch.zeros(())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type)
        return params, norm

    def _agree(self, norm: torch.Tensor) -> dict:
        """Which ranks saw a non-finite loss / gradient norm; the same answer on every rank."""
        rank, world_size = get_dist_info()
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool)
        flags = torch.zeros(2, world_size, device=norm.device)
        flags[0, rank] = (~loss_ok).float().to(norm.device)
        flags[1, rank] = (~torch.isfinite(norm)).float()
        if is_distributed():
            all_reduce(flags, op='sum')
        flags = flags.cpu()
        self._loss_ok = None
        return dict(loss_ranks=flags[0].nonzero().flatten().tolist(),
                    grad_ranks=flags[1].nonzero().flatten().tolist())

    def _clip(self, params: Sequence[torch.Tensor], norm: torch.Tensor) -> None:
        if not self.clip_grad_kwargs:
            return
        if self.grad_name == 'grad_norm':
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_kwargs['max_norm'], norm)
            self.message_hub.update_scalar(f'train/{self.grad_name}', float(norm))
        else:
            self.clip_func(params, **self.clip_grad_kwargs)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _iter(self) -> int:
        return int(self.message_hub.get_info('iter', 0) or 0)

    def _count_skipped_step_as_taken(self) -> None:
        # mmengine's schedulers warn "scheduler.step() before optimizer.step()" when the optimizer has
        # never stepped by their second step; a skipped update is still a scheduled step.
        if hasattr(self.optimizer, '_global_step'):
            self.optimizer._global_step += 1

    def _record_skip(self, verdict: dict, norm: torch.Tensor, kind: str = 'non-finite') -> None:
        self.consecutive_skips += 1
        self.last_step_skipped = True
        total = int(self.message_hub.get_info(SKIPS_TOTAL, 0) or 0) + 1
        self.message_hub.update_info(SKIPS_TOTAL, total, resumed=True)
        self.message_hub.update_info(CONSECUTIVE_SKIPS, self.consecutive_skips, resumed=True)
        self._publish_counts()
        it = self._iter()
        self.last_skip = dict(iter=it, loss=float(self._last_loss.float().mean()), grad_norm=float(norm),
                              **verdict)
        what = []
        if verdict['loss_ranks']:
            what.append(f"loss on rank(s) {verdict['loss_ranks']}")
        if verdict['grad_ranks']:
            what.append(f"gradient norm on rank(s) {verdict['grad_ranks']}")
        print_log(
            f'iter {it + 1}: {kind} {" and ".join(what) or "values"} (loss {self.last_skip["loss"]:.4g}, '
            f'grad norm {self.last_skip["grad_norm"]:.4g}): update skipped on every rank '
            f'({self.consecutive_skips} in a row, {total} in total)',
            logger='current', level=logging.WARNING)
        self._count_skipped_step_as_taken()
        self.zero_grad()

    def _record_update(self) -> None:
        self.consecutive_skips = 0
        self.last_step_skipped = False
        self.message_hub.update_info(CONSECUTIVE_SKIPS, 0, resumed=True)
        self._publish_counts()

    def _publish_counts(self) -> None:
        self.message_hub.update_scalar(SKIPPED_STEPS, int(self.message_hub.get_info(SKIPS_TOTAL, 0) or 0))

    def reset_skip_streak(self) -> None:
        """Called after a rollback: the streak that caused it is over."""
        self.consecutive_skips = 0
        self.message_hub.update_info(CONSECUTIVE_SKIPS, 0, resumed=True)


@OPTIM_WRAPPERS.register_module()
class GuardedOptimWrapper(_NonFiniteGuard, OptimWrapper):
    """``OptimWrapper`` that skips (on all ranks) any update with a non-finite loss or gradient norm."""

    def __init__(self, *args, inject_nonfinite: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_guard(inject_nonfinite)

    def step(self, **kwargs) -> None:
        params, norm = self._grads_and_norm()
        verdict = self._agree(norm)
        if verdict['loss_ranks'] or verdict['grad_ranks']:
            self._record_skip(verdict, norm)
            return
        self._clip(params, norm)
        self.optimizer.step(**kwargs)
        self._record_update()


@OPTIM_WRAPPERS.register_module()
class GuardedAmpOptimWrapper(_NonFiniteGuard, AmpOptimWrapper):
    """``AmpOptimWrapper`` with the same guard; GradScaler's own overflow skips are counted apart.

    Args:
        min_loss_scale (float): an overflow that pushes the loss scale below this also counts as a
            guard skip (towards rollback): the gradients are non-finite even without scaling.
    """

    def __init__(self, *args, min_loss_scale: float = 1.0, inject_nonfinite: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_loss_scale = min_loss_scale
        self._init_guard(inject_nonfinite)

    def step(self, **kwargs) -> None:
        scaler = self.loss_scaler
        scaler.unscale_(self.optimizer)  # the check and the clip need the true gradients
        params, norm = self._grads_and_norm()
        verdict = self._agree(norm)
        if verdict['loss_ranks']:
            # leave the scale as it is (update() with the current value just closes the iteration)
            scaler.update(scaler.get_scale())
            self._record_skip(verdict, norm)
            return
        if verdict['grad_ranks']:
            self._record_overflow(scaler, norm, locally=not bool(torch.isfinite(norm)))
            if scaler.get_scale() < self.min_loss_scale:
                self._record_skip(verdict, norm, kind=f'loss scale below {self.min_loss_scale:g}:')
            else:
                self._count_skipped_step_as_taken()
                self.zero_grad()
                self._publish_counts()
            return
        self._clip(params, norm)
        scaler.step(self.optimizer, **kwargs)  # already unscaled and finite: steps
        scaler.update(self._scale_update_param)
        self._record_update()

    def _record_overflow(self, scaler, norm: torch.Tensor, locally: bool) -> None:
        if locally:
            scaler.update(self._scale_update_param)  # GradScaler's own back-off
        else:
            # another rank overflowed (no gradient all-reduce made it ours): back off the same way
            new_scale = self._scale_update_param or scaler.get_scale() * scaler.get_backoff_factor()
            scaler.update(new_scale)
        total = int(self.message_hub.get_info(AMP_OVERFLOWS_TOTAL, 0) or 0) + 1
        self.message_hub.update_info(AMP_OVERFLOWS_TOTAL, total, resumed=True)
        print_log(f'iter {self._iter() + 1}: fp16 gradient overflow, update skipped, loss scale now '
                  f'{scaler.get_scale():g} ({total} overflows in total)', logger='current', level=logging.INFO)

    def _publish_counts(self) -> None:
        super()._publish_counts()
        hub = self.message_hub
        hub.update_scalar(AMP_OVERFLOW_STEPS, int(hub.get_info(AMP_OVERFLOWS_TOTAL, 0) or 0))
        # every update, not only at an overflow: the scale also grows back between overflows
        hub.update_scalar('train/loss_scale', float(self.loss_scaler.get_scale()))


class _Injection:
    """Test-only: where to make values non-finite.

    Iterations are ``runner.iter`` values (0-based). A rollback sends the run back to earlier iterations;
    with ``once=True`` each listed iteration fires only the first time it is reached.
    """

    def __init__(self, loss_iters: Sequence[int] = (), grad_iters: Sequence[int] = (),
                 ranks: Optional[Sequence[int]] = None, once: bool = False):
        self.loss_iters = set(loss_iters)
        self.grad_iters = set(grad_iters)
        self.ranks = None if ranks is None else set(ranks)
        self.once = once
        self._fired = set()

    def hits(self, iters: set, it: int) -> bool:
        if it not in iters or (self.ranks is not None and get_dist_info()[0] not in self.ranks):
            return False
        key = (id(iters), it)
        if self.once and key in self._fired:
            return False
        self._fired.add(key)
        return True

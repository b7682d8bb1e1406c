"""Test-side hooks of benchmarks/benchmark_ddp.py, imported by the training processes through ``custom_imports``
(benchmarks/ on their PYTHONPATH): per rank and iteration one JSON line (losses, image ids, the guard's skip
counters, a weight fingerprint, time per iteration), re-seeding every RNG from the iteration's position in the
global sample stream, and a signal to one rank.
"""
import hashlib
import json
import os
import random
import signal

from _bootstrap import setup_repo_path

setup_repo_path()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.dist import get_dist_info  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import is_model_wrapper  # noqa: E402

from mmdet.registry import HOOKS  # noqa: E402
from projects.vim_disc.engine.optim_wrapper import AMP_OVERFLOWS_TOTAL, SKIPS_TOTAL  # noqa: E402


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
                   amp_overflows=hub.get_info(AMP_OVERFLOWS_TOTAL),
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

"""Resume the data stream at any iteration without loading a single sample.

mmengine's ``IterBasedTrainLoop`` resumes by pulling every already-trained batch through the dataloader
(images decoded, pipelines run, then thrown away): at iteration 20,000 that is most of the original run's
data time again. The index stream of an ``InfiniteSampler`` is a pure function of (seed, position), so
the position can be set directly:

* ``ResumableInfiniteSampler``: the same stream as mmengine's ``InfiniteSampler`` (same seed -> the same
  indices), plus ``skip(n)``: the next index is this rank's n-th. Skipping regenerates one permutation per
  epoch already passed (``torch.randperm``; ~1 ms for COCO), never touching the dataset.
* ``ResumableAspectRatioBatchSampler``: mmdet's ``AspectRatioBatchSampler`` groups indices into a
  portrait and a landscape bucket, so a batch consumes a variable number of indices and the buckets
  carry a partial batch over. ``fast_forward(n)`` replays that grouping arithmetically (cumulative counts
  over the index stream, from each image's width/height metadata) and restores both the stream position
  and the buckets' contents exactly.
* ``StreamIndex`` / ``SeedFromStreamPosition``: the sampler yields indices that also carry their position in
  the stream; the transform, first in a training pipeline, reseeds a dataloader worker's RNGs from
  (seed, position) before each sample, so a sample's augmentation (flip, LSJ scale, crop) depends only on
  where it is in the stream, not on which worker or how many samples came before it since the workers
  started. With ``num_workers > 0`` a resumed run therefore augments exactly like an uninterrupted one
  (the main process's RNGs, used with ``num_workers=0``, travel in the checkpoint: ``RNGStateHook``).
* ``ResumableIterBasedTrainLoop``: ``IterBasedTrainLoop`` that creates its dataloader iterator only in
  ``run()``, after the runner resumed, positioned at the resumed iteration.
* ``ResumableRunner``: a ``Runner`` whose restarts (``resume=True``) keep writing into the first start's
  log directory, so a job requeued ten times still has one text log and one TensorBoard run.

Configs use them by name::

    train_dataloader = dict(sampler=dict(type='ResumableInfiniteSampler', shuffle=True),
                            batch_sampler=dict(type='ResumableAspectRatioBatchSampler'), ...)
    train_cfg = dict(type='ResumableIterBasedTrainLoop', max_iters=..., val_interval=...)
    runner_type = 'ResumableRunner'
"""
import logging
import os.path as osp
import random
import time
from typing import Dict, Iterator, List, Optional, Sequence, Sized, Tuple, Union

import numpy as np
import torch
from mmengine.dataset import InfiniteSampler
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop, Runner
from mmengine.runner.base_loop import BaseLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator
from mmengine.runner.utils import calc_dynamic_intervals
from mmcv.transforms import BaseTransform
from torch.utils.data import BatchSampler, DataLoader, get_worker_info

from mmdet.datasets.samplers import AspectRatioBatchSampler
from mmdet.registry import DATA_SAMPLERS, LOOPS, RUNNERS, TRANSFORMS
from .checkpoint import write_text_atomically


class StreamIndex(int):
    """A dataset index that also knows where it is in the training stream.

    It is an ``int`` everywhere (datasets index with it; mmengine's ``get_data_info`` stores it as the
    sample's ``sample_idx``), plus ``position`` (the global stream element, unique across ranks) and the
    sampler's ``seed``: what ``SeedFromStreamPosition`` needs to make the sample's augmentation a pure
    function of its position.
    """

    def __new__(cls, index: int, position: int, seed: int):
        self = super().__new__(cls, index)
        self.position = int(position)
        self.seed = int(seed)
        return self

    def __getnewargs__(self):  # pickled into dataloader workers with its fields
        return int(self), self.position, self.seed

    def __repr__(self) -> str:
        return f'StreamIndex({int(self)}, position={self.position}, seed={self.seed})'


def stream_sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of the stream with ``seed``; SeedSequence mixes the two, so
    neighbouring positions (and seeds) get unrelated random streams."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, position]).generate_state(1, np.uint64)[0] >> 1)


@TRANSFORMS.register_module()
class SeedFromStreamPosition(BaseTransform):
    """Reseed the dataloader worker's ``random``, ``numpy`` and ``torch`` RNGs from the sample's stream position.

    Put it first in the training pipeline of a loader whose sampler is ``ResumableInfiniteSampler``. In a
    worker process it makes every random choice of the following transforms a function of (seed, position)
    only, so resuming at any iteration (and any ``num_workers``) replays the same augmentations. In the main
    process (``num_workers=0``) it does nothing: those RNGs also drive the model and are checkpointed whole.
    A sample without a stream position (validation, or mmengine's retry after a pipeline returned None)
    keeps the worker's RNG as it is, which is itself already determined by the position seeded before.
    """

    def transform(self, results: dict) -> dict:
        idx = results.get('sample_idx')
        if isinstance(idx, StreamIndex) and get_worker_info() is not None:
            seed = stream_sample_seed(idx.seed, idx.position)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            torch.manual_seed(seed)
        return results


@DATA_SAMPLERS.register_module()
class ResumableInfiniteSampler(InfiniteSampler):
    """``InfiniteSampler`` whose stream can start at any position.

    The global stream is the concatenation of one permutation per epoch (seeded generator); rank ``r`` of
    ``W`` takes the global elements ``r, r + W, r + 2W, ...``. Its n-th index is therefore global element
    ``r + n W``: epoch ``(r + n W) // size``, offset ``(r + n W) % size``.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: Optional[int] = None) -> None:
        self.start = 0
        super().__init__(dataset, shuffle=shuffle, seed=seed)

    def skip(self, num_indices: int) -> None:
        """Make the next index this rank's ``num_indices``-th (0-based) of the stream."""
        self.start = int(num_indices)
        self.indices = self._indices_of_rank()

    def rank_chunks(self, start: int = 0) -> Iterator[torch.Tensor]:
        """This rank's stream from position ``start``, one tensor per epoch (the first may be partial)."""
        first = self.rank + start * self.world_size
        epoch, offset = divmod(first, self.size)
        g = torch.Generator()
        g.manual_seed(self.seed)
        if self.shuffle:
            for _ in range(epoch):  # the generator's state after `epoch` permutations
                torch.randperm(self.size, generator=g)
        while True:
            perm = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
            yield perm[offset::self.world_size]
            # the first element of the next epoch that is ours: positions stay == rank (mod W) globally
            offset = (offset - self.size) % self.world_size

    def _indices_of_rank(self) -> Iterator[int]:
        n = self.start
        for chunk in self.rank_chunks(self.start):
            for index in chunk.tolist():
                yield StreamIndex(index, self.position_of(n), self.seed)
                n += 1

    def position_of(self, n: int) -> int:
        """The global stream element of this rank's n-th index."""
        return self.rank + n * self.world_size


@DATA_SAMPLERS.register_module()
class ResumableAspectRatioBatchSampler(AspectRatioBatchSampler):
    """``AspectRatioBatchSampler`` that can fast-forward by whole batches without loading data.

    Needs a sampler with ``rank_chunks`` / ``skip`` (``ResumableInfiniteSampler``). The bucket of every
    dataset index (portrait: width < height) comes from ``dataset.get_data_info`` once per process.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self._buckets_of: Optional[np.ndarray] = None

    def bucket_ids(self) -> np.ndarray:
        if self._buckets_of is None:
            dataset = self.sampler.dataset
            ids = np.empty(len(dataset), dtype=np.int8)
            for i in range(len(dataset)):
                info = dataset.get_data_info(i)
                ids[i] = 0 if info['width'] < info['height'] else 1
            self._buckets_of = ids
        return self._buckets_of

    def fast_forward(self, num_batches: int) -> None:
        """Leave the sampler and the buckets exactly as after yielding ``num_batches`` batches.

        A batch is yielded the moment a bucket reaches ``batch_size``, so after k indices the number of
        batches so far is ``sum_b floor(count_b(k) / batch_size)``: non-decreasing in k, found by a
        search over cumulative counts. What is left in each bucket is the last ``count_b mod batch_size``
        indices that went into it.
        """
        if not hasattr(self.sampler, 'rank_chunks'):
            raise TypeError(f'{type(self).__name__}.fast_forward needs ResumableInfiniteSampler, '
                            f'got {type(self.sampler).__name__}')
        bs = self.batch_size
        buckets_of = self.bucket_ids()
        counts = np.zeros(2, dtype=np.int64)
        # per bucket, the last indices that went into it and their numbers n in this rank's stream
        tails: List[np.ndarray] = [np.empty((0, 2), np.int64), np.empty((0, 2), np.int64)]
        consumed = 0
        if num_batches > 0:
            for chunk in self.sampler.rank_chunks(0):
                idx = chunk.numpy()
                bucket = buckets_of[idx]
                cum = counts[None, :] + np.stack([np.cumsum(bucket == 0), np.cumsum(bucket == 1)], axis=1)
                batches = (cum // bs).sum(axis=1)
                stop = int(np.searchsorted(batches, num_batches))  # first k with batches(k) >= target
                take = len(idx) if stop == len(idx) else stop + 1
                numbered = np.stack([idx[:take], consumed + np.arange(take)], axis=1)
                for b in (0, 1):
                    tails[b] = np.concatenate([tails[b], numbered[bucket[:take] == b]])[-bs:]
                counts = cum[take - 1]
                consumed += take
                if stop < len(idx):
                    break
        self._aspect_ratio_buckets = [
            [StreamIndex(index, self.sampler.position_of(n), self.sampler.seed)
             for index, n in tails[b][len(tails[b]) - int(counts[b] % bs):].tolist()] for b in (0, 1)]
        self.sampler.skip(consumed)


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that resumes its data stream by position instead of by replay.

    The dataloader iterator is created in ``run()`` (mmengine creates it at construction, before the
    checkpoint is loaded, and with workers already prefetches from position 0). Creating it leaves the
    global torch RNG untouched, so a resumed run and an uninterrupted one draw the same random numbers.
    With a batch sampler that has neither ``fast_forward`` nor a skippable sampler underneath, the
    stock replay is used, with a warning.
    """

    def __init__(self, runner, dataloader: Union[DataLoader, Dict], max_iters: int, val_begin: int = 1,
                 val_interval: int = 1000, dynamic_intervals: Optional[List[Tuple[int, int]]] = None) -> None:
        BaseLoop.__init__(self, runner, dataloader)
        self._max_iters = int(max_iters)
        assert self._max_iters == max_iters, f'`max_iters` should be a integer number, but get {max_iters}'
        self._max_epochs = 1
        self._epoch = 0
        self._iter = 0
        self.val_begin = val_begin
        self.val_interval = val_interval
        self.stop_training = False
        if hasattr(self.dataloader.dataset, 'metainfo'):
            self.runner.visualizer.dataset_meta = self.dataloader.dataset.metainfo
        self.dataloader_iterator = None
        self.dynamic_milestones, self.dynamic_intervals = calc_dynamic_intervals(
            self.val_interval, dynamic_intervals)
        self.resume_seconds: Optional[float] = None

    def run(self) -> torch.nn.Module:
        self.runner.call_hook('before_train')
        self.runner.call_hook('before_train_epoch')
        self.start_data_stream(self._iter)
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            # a preempted run stops at once: no validation between the signal and the exit
            if (not self.stop_training and self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model

    def start_data_stream(self, num_batches: int) -> None:
        """Create the dataloader iterator so that its next batch is batch ``num_batches`` of the run."""
        t0 = time.perf_counter()
        how = position_data_stream(self.dataloader, num_batches)
        rng = torch.get_rng_state()
        self.dataloader_iterator = _InfiniteDataloaderIterator(self.dataloader)
        torch.set_rng_state(rng)  # the iterator draws its worker base seed from the global RNG
        if how is None:
            print_log(f'{type(self.dataloader.batch_sampler).__name__} / {type(self.dataloader.sampler).__name__} '
                      f'cannot skip by position: replaying {num_batches} batches (slow); use '
                      'ResumableInfiniteSampler (+ ResumableAspectRatioBatchSampler)',
                      logger='current', level=logging.WARNING)
            for _ in range(num_batches):
                next(self.dataloader_iterator)
            how = 'replay'
        self.resume_seconds = time.perf_counter() - t0
        if num_batches:
            print_log(f'data stream resumed at batch {num_batches} by {how} in {self.resume_seconds:.3f} s',
                      logger='current')


def position_data_stream(dataloader: DataLoader, num_batches: int) -> Optional[str]:
    """Set ``dataloader``'s samplers so its next batch is batch ``num_batches``; None if they cannot."""
    batch_sampler = dataloader.batch_sampler
    sampler = dataloader.sampler if batch_sampler is None else batch_sampler.sampler
    if hasattr(batch_sampler, 'fast_forward'):
        batch_sampler.fast_forward(num_batches)
        return 'bucket replay of indices'
    if hasattr(sampler, 'skip') and type(batch_sampler) is BatchSampler:
        sampler.skip(num_batches * batch_sampler.batch_size)  # a plain batch takes batch_size indices
        return 'sampler skip'
    return None if num_batches else 'start'


def index_stream(batch_sampler, num_batches: int) -> Sequence[List[int]]:
    """The next ``num_batches`` index batches (for tests and benchmarks; loads no data)."""
    it = iter(batch_sampler)
    return [next(it) for _ in range(num_batches)]


@RUNNERS.register_module()
class ResumableRunner(Runner):
    """``Runner`` whose restarts with ``resume=True`` log into the first start's directory.

    mmengine names the log directory ``work_dir/<timestamp>`` (and the experiment, hence the message hub
    and visualizer) after the start time, so each restart of a preempted job would open a new one. This
    runner keeps the first start's timestamp in ``work_dir/run_timestamp`` and reuses it when resuming; the
    text log and ``vis_data/scalars.json`` are opened for appending and TensorBoard merges the event files
    of one directory. A run started without ``resume`` begins a new directory, as usual.
    """

    STAMP_FILE = 'run_timestamp'

    def __init__(self, *args, **kwargs):
        self._reuse_log_dir = bool(kwargs.get('resume', False))  # Runner stores resume after setup_env
        super().__init__(*args, **kwargs)

    def setup_env(self, env_cfg: dict) -> None:
        super().setup_env(env_cfg)
        stamp_file = osp.join(self._work_dir, self.STAMP_FILE)
        if self._reuse_log_dir and osp.isfile(stamp_file):
            with open(stamp_file) as f:
                self._timestamp = f.read().strip()  # every rank reads the same file: no broadcast needed
        elif is_main_process():
            write_text_atomically(stamp_file, self._timestamp)

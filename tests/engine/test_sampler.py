"""Resuming the data stream by position: same indices as a replay, without reading the dataset."""
import itertools
import os.path as osp
import pickle
import random

import numpy as np
import pytest
import torch
from mmengine.dataset import InfiniteSampler
from mmengine.hooks import Hook

import mmengine.dataset.sampler as mmengine_sampler
from mmdet.datasets.samplers import AspectRatioBatchSampler
from mmengine.dataset import BaseDataset, pseudo_collate
from projects.vim_disc.engine.sampler import (ResumableAspectRatioBatchSampler, ResumableInfiniteSampler,
                                              ResumableIterBasedTrainLoop, SeedFromStreamPosition, StreamIndex,
                                              index_stream, position_data_stream)
from tests.engine.toy_runner import ToyDataset, toy_runner, weights


class _Sized:
    """Dataset stand-in with image metadata only (the samplers never need more)."""

    def __init__(self, size, seed=0):
        rng = np.random.default_rng(seed)
        self.shapes = [(int(w), int(h)) for w, h in rng.integers(50, 100, size=(size, 2))]
        self.get_data_info_calls = 0

    def __len__(self):
        return len(self.shapes)

    def get_data_info(self, i):
        self.get_data_info_calls += 1
        w, h = self.shapes[i]
        return dict(width=w, height=h)


@pytest.fixture
def world(monkeypatch):
    def set_world(rank, world_size):
        monkeypatch.setattr(mmengine_sampler, 'get_dist_info', lambda: (rank, world_size))
    return set_world


@pytest.mark.parametrize('world_size', [1, 2, 3])
@pytest.mark.parametrize('shuffle', [True, False])
def test_same_stream_as_mmengine_infinite_sampler(world, world_size, shuffle):
    size = 7
    for rank in range(world_size):
        world(rank, world_size)
        ours = ResumableInfiniteSampler(_Sized(size), shuffle=shuffle, seed=5)
        theirs = InfiniteSampler(_Sized(size), shuffle=shuffle, seed=5)
        assert list(itertools.islice(ours, 40)) == list(itertools.islice(theirs, 40))


@pytest.mark.parametrize('world_size,rank', [(1, 0), (2, 1), (3, 0), (3, 2)])
def test_skip_starts_at_the_right_position(world, world_size, rank):
    world(rank, world_size)
    full = list(itertools.islice(ResumableInfiniteSampler(_Sized(11), seed=1), 200))
    for start in (0, 1, 10, 11, 37, 150):
        sampler = ResumableInfiniteSampler(_Sized(11), seed=1)
        sampler.skip(start)
        assert list(itertools.islice(sampler, 50)) == full[start:start + 50], start


@pytest.mark.parametrize('batch_size', [2, 3])
@pytest.mark.parametrize('world_size,rank', [(1, 0), (2, 1)])
def test_aspect_ratio_fast_forward_matches_the_live_batches(world, batch_size, world_size, rank):
    world(rank, world_size)
    dataset = _Sized(13, seed=batch_size)
    live = ResumableAspectRatioBatchSampler(ResumableInfiniteSampler(dataset, seed=3), batch_size)
    expected = index_stream(live, 80)
    # mmdet's own batch sampler over mmengine's own sampler gives the same batches
    stock = AspectRatioBatchSampler(InfiniteSampler(_Sized(13, seed=batch_size), seed=3), batch_size)
    assert index_stream(stock, 80) == expected
    for n in (0, 1, 5, 6, 7, 30, 61):
        resumed = ResumableAspectRatioBatchSampler(ResumableInfiniteSampler(dataset, seed=3), batch_size)
        resumed.fast_forward(n)
        assert index_stream(resumed, 80 - n) == expected[n:], n


def test_fast_forward_restores_partial_buckets():
    """A case where a bucket carries indices over the resume point (else the check above is weak)."""
    dataset = _Sized(13, seed=2)
    sampler = ResumableAspectRatioBatchSampler(ResumableInfiniteSampler(dataset, seed=3), 3)
    carried = 0
    for n in range(1, 30):
        sampler.fast_forward(n)
        carried += sum(len(b) for b in sampler._aspect_ratio_buckets) > 0
    assert carried > 10


def test_fast_forward_reads_metadata_once_and_no_samples():
    dataset = _Sized(13)
    sampler = ResumableAspectRatioBatchSampler(ResumableInfiniteSampler(dataset, seed=0), 2)
    sampler.fast_forward(500)
    sampler.fast_forward(1000)
    assert dataset.get_data_info_calls == 13


class _CountingToy(ToyDataset):
    def __init__(self, size=13):
        super().__init__(size)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_plain_batch_sampler_skips_at_the_sampler():
    loader = torch.utils.data.DataLoader(_CountingToy(), batch_size=4,
                                         sampler=ResumableInfiniteSampler(_CountingToy(), seed=0))
    assert position_data_stream(loader, 5) == 'sampler skip'
    assert loader.sampler.start == 20


def _loop_cfg(max_iters):
    return dict(type=ResumableIterBasedTrainLoop, max_iters=max_iters)


class _BatchRecorder(Hook):
    def __init__(self):
        self.batches = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.batches.append(data_batch['x'].clone())


def test_loop_resumes_by_position_with_the_same_batches(tmp_path):
    sampler = dict(type=ResumableInfiniteSampler, shuffle=True, seed=0)
    full_rec = _BatchRecorder()
    full = toy_runner(tmp_path / 'full', max_iters=7, ckpt_interval=4, sampler=sampler, dropout=0.0,
                      train_cfg=_loop_cfg(7), custom_hooks=[full_rec])
    full.train()

    resumed_rec = _BatchRecorder()
    resumed = toy_runner(tmp_path / 'resumed', max_iters=7, ckpt_interval=4, sampler=sampler, dropout=0.0,
                         train_cfg=_loop_cfg(7), custom_hooks=[resumed_rec], resume=True,
                         load_from=osp.join(tmp_path / 'full', 'iter_4.pth'), dataset=_CountingToy())
    resumed.train()
    assert resumed.train_loop.iter == 7
    assert resumed.train_dataloader.dataset.reads == 3 * 2  # the three remaining batches, nothing replayed
    for got, want in zip(resumed_rec.batches, full_rec.batches[4:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(resumed_rec.batches) == 3
    for k, v in weights(full).items():
        torch.testing.assert_close(weights(resumed)[k], v, rtol=0, atol=0)


def test_loop_falls_back_to_replay_with_a_warning(tmp_path):
    runner = toy_runner(tmp_path / 'a', max_iters=3, ckpt_interval=2, train_cfg=_loop_cfg(3), dropout=0.0)
    runner.train()
    resumed = toy_runner(tmp_path / 'b', max_iters=3, ckpt_interval=2, train_cfg=_loop_cfg(3), resume=True,
                         load_from=osp.join(tmp_path / 'a', 'iter_2.pth'), dropout=0.0)
    resumed.train()
    text = ''.join(p.read_text() for p in (tmp_path / 'b').rglob('*.log'))
    assert 'replaying 2 batches' in text
    for k, v in weights(runner).items():
        torch.testing.assert_close(weights(resumed)[k], v, rtol=0, atol=0)


def test_registered_for_configs():
    from mmdet.registry import DATA_SAMPLERS, LOOPS
    assert DATA_SAMPLERS.get('ResumableInfiniteSampler') is ResumableInfiniteSampler
    assert DATA_SAMPLERS.get('ResumableAspectRatioBatchSampler') is ResumableAspectRatioBatchSampler
    assert LOOPS.get('ResumableIterBasedTrainLoop') is ResumableIterBasedTrainLoop


# ---- augmentation as a function of the stream position (dataloader workers) ----

def test_stream_index_is_an_int_that_keeps_its_position_through_pickling():
    i = StreamIndex(5, position=42, seed=7)
    assert i == 5 and [10, 11, 12, 13, 14, 15][i] == 15 and hash(i) == hash(5)
    back = pickle.loads(pickle.dumps([i]))[0]
    assert type(back) is StreamIndex and (int(back), back.position, back.seed) == (5, 42, 7)


@pytest.mark.parametrize('world_size', [1, 3])
@pytest.mark.parametrize('batch_size', [2, 3])
def test_positions_survive_fast_forward(world, world_size, batch_size):
    """Live batches and fast-forwarded ones carry the same (index, position): global element r + n W."""
    world(world_size - 1, world_size)
    data = _Sized(11)
    live = index_stream(ResumableAspectRatioBatchSampler(ResumableInfiniteSampler(data, seed=3), batch_size), 12)
    flat = sorted((i.position for b in live for i in b))
    assert all(p % world_size == world_size - 1 for p in flat) and len(set(flat)) == len(flat)
    for k in (0, 1, 5, 9):
        resumed = ResumableAspectRatioBatchSampler(ResumableInfiniteSampler(data, seed=3), batch_size)
        resumed.fast_forward(k)
        got = index_stream(resumed, 12 - k)
        assert [[(int(i), i.position, i.seed) for i in b] for b in got] == \
            [[(int(i), i.position, i.seed) for i in b] for b in live[k:]]


class _DrawDataset(BaseDataset):
    """Each sample draws from random, numpy and torch in its pipeline, like flips and LSJ scales do."""

    def __init__(self, seeded):
        pipeline = ([SeedFromStreamPosition()] if seeded else []) + [self._draw]
        super().__init__(pipeline=pipeline, serialize_data=False)

    def load_data_list(self):
        return [dict(width=64, height=48 if i % 3 else 80) for i in range(13)]

    @staticmethod
    def _draw(results):
        return (int(results['sample_idx']), random.random(), float(np.random.rand()), float(torch.rand(())))


def _draws(seeded, num_workers, start, num_batches, batch_size=3):
    dataset = _DrawDataset(seeded)
    batch_sampler = ResumableAspectRatioBatchSampler(ResumableInfiniteSampler(dataset, seed=11), batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                         collate_fn=pseudo_collate)
    position_data_stream(loader, start)
    it = iter(loader)
    return [next(it) for _ in range(num_batches)]


@pytest.mark.slow
def test_workers_augment_a_resumed_stream_exactly_like_an_uninterrupted_one():
    full = _draws(True, num_workers=2, start=0, num_batches=8)
    resumed = _draws(True, num_workers=2, start=5, num_batches=3)
    assert resumed == full[5:]
    # and independently of how many workers there are
    assert _draws(True, num_workers=1, start=0, num_batches=8) == full
    # without the transform, restarted workers restart their RNG streams: the same samples, other draws
    plain_full = _draws(False, num_workers=2, start=0, num_batches=8)
    plain_resumed = _draws(False, num_workers=2, start=5, num_batches=3)
    assert [b[0] for b in plain_resumed] == [b[0] for b in plain_full[5:]]  # (pseudo_collate: field 0 = indices)
    assert plain_resumed != plain_full[5:]


def test_seeding_leaves_the_main_process_rngs_alone():
    """num_workers=0: the main process's RNGs also drive the model; RNGStateHook checkpoints them whole."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    SeedFromStreamPosition()(dict(sample_idx=StreamIndex(3, position=9, seed=1)))
    assert torch.equal(torch.get_rng_state(), before)

"""The synthetic shapes dataset: valid, self-consistent COCO; deterministic; safe first use; loads in mmdet."""
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from shapely.geometry import box

from projects.vim_disc.datasets import shapes
from projects.vim_disc.datasets.shapes import ShapesDataset, generate_shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small and fast: odd counts, the real size range.
SMALL = dict(seed=0, num_train=12, num_val=7)


@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes') / 'shapes')
    info = generate_shapes_dataset(root, **SMALL)
    assert info['generated']
    return root


def _tree_bytes(root):
    """Every file under root (relative path -> bytes)."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def _eroded(mask):
    """Pixels whose 4 neighbours are in the mask too: away from anti-aliased edges."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


# ----------------------------------------------------------------------------------------------------
# The json is valid COCO and agrees with itself and with the pixels.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('split', shapes.SPLITS)
def test_coco_json_is_valid_and_self_consistent(small_root, split):
    coco = COCO(os.path.join(small_root, 'annotations', f'instances_{split}.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(shapes.CLASSES)
    assert len(coco.getImgIds()) == SMALL[f'num_{split}']
    for image_id in coco.getImgIds():
        image = coco.imgs[image_id]
        width, height = image['width'], image['height']
        assert 128 <= width <= 256 and 128 <= height <= 256
        with Image.open(os.path.join(small_root, split, image['file_name'])) as png:
            assert png.size == (width, height) and png.mode == 'RGB'
        annotations = coco.imgToAnns[image_id]
        assert 1 <= len(annotations) <= shapes.MAX_OBJECTS
        for ann in annotations:
            assert ann['iscrowd'] == 0 and ann['category_id'] in coco.cats
            assert ann['segmentation'], 'an instance without a polygon'
            xy = []
            for polygon in ann['segmentation']:
                assert len(polygon) >= 6 and len(polygon) % 2 == 0
                points = np.asarray(polygon).reshape(-1, 2)
                assert (points >= 0).all() and (points <= [width, height]).all(), 'polygon leaves the image'
                xy.append(points)
            xy = np.concatenate(xy)
            x, y, w, h = ann['bbox']
            extents = [*xy.min(axis=0), *(xy.max(axis=0) - xy.min(axis=0))]
            np.testing.assert_allclose([x, y, w, h], extents, atol=0.011)  # both rounded to 0.01
            assert ann['area'] > 0
            # pycocotools rasterises pixel centres: on these sizes within a few % of the polygon area
            rasterised = int(coco.annToMask(ann).sum())
            assert rasterised == pytest.approx(ann['area'], rel=0.06)


def test_labels_are_the_visible_regions_of_the_painted_shapes(small_root):
    """Inside each label the image is one flat colour plus the pixel noise; a label that also covered the
    shape's occluded part (another colour on top) or missed the painted shape would not be."""
    coco = COCO(os.path.join(small_root, 'annotations', 'instances_train.json'))
    overlapping = 0
    for image_id, annotations in coco.imgToAnns.items():
        image = coco.imgs[image_id]
        with Image.open(os.path.join(small_root, 'train', image['file_name'])) as png:
            pixels = np.asarray(png, np.float32)
        for ann in annotations:
            inner = _eroded(coco.annToMask(ann).astype(bool))
            assert inner.sum() > 0
            assert pixels[inner].std(axis=0).max() < 2.5 * shapes.OBJECT_NOISE_STD
        boxes = [box(x, y, x + w, y + h) for x, y, w, h in (ann['bbox'] for ann in annotations)]
        overlapping += sum(a.intersection(b).area > 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert overlapping > 0, 'no occlusion in these images: the check above proved less than it claims'


def test_visible_region_is_outline_minus_later_outlines():
    first, second = box(0, 0, 20, 20), box(10, 10, 30, 30)
    lower, upper = shapes._visible_regions([first, second])
    assert lower.area == pytest.approx(400 - 100) and upper.equals(second)
    assert shapes._well_visible(lower, first)
    # a later shape inside an earlier one would leave a hole, which a COCO polygon cannot hold
    ring, _ = shapes._visible_regions([first, box(5, 5, 15, 15)])
    assert not shapes._well_visible(ring, first)
    # mostly hidden (< 30 %) is rejected
    hidden, _ = shapes._visible_regions([first, box(0, 0, 20, 16)])
    assert not shapes._well_visible(hidden, first)


# ----------------------------------------------------------------------------------------------------
# Determinism and the marker.
# ----------------------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files_and_other_seeds_differ(tmp_path, small_root):
    args = dict(SMALL, num_train=5, num_val=3)
    generate_shapes_dataset(str(tmp_path / 'a'), **args)
    generate_shapes_dataset(str(tmp_path / 'b'), **args)
    a, b = _tree_bytes(tmp_path / 'a'), _tree_bytes(tmp_path / 'b')
    assert a == b and len(a) == 5 + 3 + 2 + 1
    # image i of a split depends on (seed, split, i) only: the first five train images of the bigger
    # dataset are the same
    big = _tree_bytes(small_root)
    assert all(a[f'train/{i:06d}.png'] == big[f'train/{i:06d}.png'] for i in range(5))
    generate_shapes_dataset(str(tmp_path / 'c'), **dict(args, seed=1))
    c = _tree_bytes(tmp_path / 'c')
    assert c.keys() == a.keys()
    assert all(c[name] != a[name] for name in a if name.endswith('.png'))
    assert c['annotations/instances_train.json'] != a['annotations/instances_train.json']


def test_workers_write_the_same_files(tmp_path):
    args = dict(SMALL, num_train=9, num_val=3)  # more images than workers x chunks: pieces arrive out of order
    generate_shapes_dataset(str(tmp_path / 'one'), **args)
    generate_shapes_dataset(str(tmp_path / 'three'), **args, workers=3)
    one, three = _tree_bytes(tmp_path / 'one'), _tree_bytes(tmp_path / 'three')
    assert one == three and len(one) == 9 + 3 + 2 + 1


def test_marker_decides_whether_to_rebuild(tmp_path):
    root = str(tmp_path / 'shapes')
    args = dict(seed=3, num_train=3, num_val=2)
    assert generate_shapes_dataset(root, **args)['generated']
    again = generate_shapes_dataset(root, **args)
    assert not again['generated'] and again['counts']['train']['images'] == 3
    assert generate_shapes_dataset(root, **args, force=True)['generated']
    # other arguments -> replaced, not merged
    changed = generate_shapes_dataset(root, **dict(args, num_val=4))
    assert changed['generated'] and len(os.listdir(os.path.join(root, 'val'))) == 4
    # a half-written dataset (no marker) and a killed builder's staging directory are cleaned up
    os.remove(os.path.join(root, shapes.MARKER))
    stale = tmp_path / '.shapes.tmp-killed'
    stale.mkdir()
    assert generate_shapes_dataset(root, **args)['generated']
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ['.shapes.lock', 'shapes']


# ----------------------------------------------------------------------------------------------------
# Several processes at first use (DDP ranks).
# ----------------------------------------------------------------------------------------------------
def _first_use(root, barrier, results):
    barrier.wait()  # start together: both find no dataset
    results.put(generate_shapes_dataset(root, seed=5, num_train=6, num_val=3))


def test_concurrent_first_use_builds_one_dataset(tmp_path):
    root = str(tmp_path / 'shapes')
    # Two processes as two DDP ranks would be; fork, since a fresh interpreter spends ~10 s importing mmdet
    # (the children only run numpy / Pillow / shapely, never torch).
    context = multiprocessing.get_context('fork')
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_first_use, args=(root, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    infos = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    # exactly one built it; the other waited on the lock and found it complete
    assert sorted(info['generated'] for info in infos) == [False, True]
    assert infos[0]['counts'] == infos[1]['counts']
    coco = COCO(os.path.join(root, 'annotations', 'instances_train.json'))
    assert len(coco.getImgIds()) == 6
    assert all(os.path.exists(os.path.join(root, 'train', image['file_name'])) for image in coco.imgs.values())
    assert sorted(os.listdir(tmp_path)) == ['.shapes.lock', 'shapes']  # no staging directory left


# ----------------------------------------------------------------------------------------------------
# Through mmdet: CocoDataset and CocoMetric.
# ----------------------------------------------------------------------------------------------------
def test_shapes_dataset_generates_on_first_use_and_gt_scores_full_map(tmp_path):
    import torch
    from mmdet.evaluation import CocoMetric
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope

    init_default_scope('mmdet')  # pipeline names resolve to mmdet's transforms, as in a config run

    root = str(tmp_path / 'shapes')
    dataset = DATASETS.build(dict(
        type='ShapesDataset', data_root=root, **SMALL,
        ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'), test_mode=True,
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                  dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape'))]))
    assert isinstance(dataset, ShapesDataset)
    assert os.path.exists(os.path.join(root, shapes.MARKER)), 'the dataset did not generate its data'
    assert dataset.metainfo['classes'] == shapes.CLASSES and len(dataset) == SMALL['num_val']

    metric = CocoMetric(ann_file=os.path.join(root, 'annotations', 'instances_val.json'), metric=['bbox', 'segm'])
    metric.dataset_meta = dataset.metainfo
    coco = COCO(os.path.join(root, 'annotations', 'instances_val.json'))
    for index in range(len(dataset)):
        sample = dataset[index]
        inputs, data_sample = sample['inputs'], sample['data_samples']
        gt = data_sample.gt_instances
        height, width = data_sample.ori_shape
        assert inputs.shape == (3, height, width)
        assert len(gt) == len(coco.imgToAnns[data_sample.img_id])
        prediction = dict(img_id=data_sample.img_id, ori_shape=data_sample.ori_shape,
                          pred_instances=dict(bboxes=gt.bboxes.tensor, labels=gt.labels,
                                              scores=torch.ones(len(gt)),
                                              masks=torch.from_numpy(gt.masks.to_ndarray()).bool()))
        metric.process({}, [prediction])
    results = metric.evaluate(len(dataset))
    assert results['coco/bbox_mAP'] == pytest.approx(1.0)
    assert results['coco/segm_mAP'] == pytest.approx(1.0)


@pytest.mark.slow
def test_generate_shapes_tool(tmp_path, capsys):
    """The script runs from any directory (it puts the repository root on sys.path) and is a thin CLI."""
    root = str(tmp_path / 'shapes')
    command = [sys.executable, os.path.join(ROOT, 'tools', 'generate_shapes.py'), '--root', root,
               '--seed', '2', '--num-train', '3', '--num-val', '2']
    first = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path), check=True)
    assert 'built in' in first.stdout
    with open(os.path.join(root, shapes.MARKER)) as f:
        marker = json.load(f)
    assert (marker['seed'], marker['num_train'], marker['num_val']) == (2, 3, 2)
    # the second run in this process: importing mmdet again in a fresh one costs ~10 s
    spec = importlib.util.spec_from_file_location('generate_shapes', os.path.join(ROOT, 'tools', 'generate_shapes.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(command[2:])
    assert 'already up to date' in capsys.readouterr().out
    tool.main(command[2:] + ['--force'])
    assert 'built in' in capsys.readouterr().out

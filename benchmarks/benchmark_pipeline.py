"""Per-image time and peak memory of the LSJ training pipeline at 1024 px: polygon vs bitmap masks.

``python benchmarks/benchmark_pipeline.py [--num-images 40] [--repeats 2] [--out work_dirs/benchmark_pipeline.json]``

Providers (one line each), all the training pipeline of configs/_base_/datasets/coco_lsj.py, read from the
config (SeedFromStreamPosition, LoadImageFromFile, LoadAnnotations, RandomFlip, RandomResize 0.1-2.0 of 1024,
absolute_range crop of 1024 with recompute_bbox, FilterAnnotations, Pad to 1024, PackDetInputs); only the
mask representation and the crop differ:
  bitmap           LoadAnnotations(poly2mask=True)  + mmdet RandomCrop   (masks as full-size bitmaps)
  polygon          LoadAnnotations(poly2mask=False) + PolygonRandomCrop  (the config as it is)
  polygon-mmdet    LoadAnnotations(poly2mask=False) + mmdet RandomCrop   (stock polygon crop: drops
                   bow-tie lobes and holes; shown only for the cost of robust clipping)

Images: the embedded shapes dataset (projects/vim_disc/datasets/shapes.py), each image and its
polygons scaled so the longer side is 1024 px, written once as a COCO copy and read through mmdet's
CocoDataset, so decoding and annotation parsing are the real ones. Every provider sees the same random
draws (numpy is reseeded per image) and providers take turns image by image. Time: wall clock of
``dataset[i]`` without tracing, also split by pipeline step. Memory: tracemalloc's peak of Python +
numpy allocations during ``dataset[i]`` (a separate pass, since tracing slows allocation). Prints a
table and writes JSON.
"""
import argparse
import copy
import json
import os
import os.path as osp
import platform
import random
import statistics
import time
import tracemalloc

from _bootstrap import setup_repo_path

REPO_ROOT = setup_repo_path()

import numpy as np  # noqa: E402
from mmengine.config import Config  # noqa: E402
from PIL import Image  # noqa: E402

LSJ_CONFIG = Config.fromfile(osp.join(REPO_ROOT, 'configs', '_base_', 'datasets', 'coco_lsj.py'))
IMAGE_SIZE = tuple(LSJ_CONFIG.image_size)


def lsj_pipeline(poly2mask, crop_type_name):
    """The config's training pipeline with the given mask representation and crop transform."""
    pipeline = copy.deepcopy(LSJ_CONFIG.train_pipeline)
    changed = []
    for t in pipeline:
        if t['type'] == 'LoadAnnotations':
            t['poly2mask'] = poly2mask
            changed.append(t['type'])
        elif t['type'] == 'PolygonRandomCrop':
            t['type'] = crop_type_name  # mmdet's RandomCrop takes the same arguments
            changed.append('PolygonRandomCrop')
    if sorted(changed) != ['LoadAnnotations', 'PolygonRandomCrop']:
        # the providers would silently compare something else
        raise ValueError(f'{LSJ_CONFIG.filename}: expected one LoadAnnotations and one PolygonRandomCrop in '
                         f'train_pipeline, found {changed}')
    return pipeline


PROVIDERS = {
    'bitmap': lsj_pipeline(True, 'RandomCrop'),
    'polygon': lsj_pipeline(False, 'PolygonRandomCrop'),
    'polygon-mmdet': lsj_pipeline(False, 'RandomCrop'),
}


def scaled_shapes_copy(work_dir, num_images, long_side=1024, seed=0):
    """The shapes train split, every image and annotation scaled so its longer side is ``long_side``."""
    from projects.vim_disc.datasets.shapes import generate_shapes_dataset
    source = osp.join(work_dir, 'shapes')
    generate_shapes_dataset(source, seed=seed, num_train=num_images, num_val=0)
    target = osp.join(work_dir, f'shapes_{long_side}')
    ann_file = osp.join(target, 'annotations', 'instances_train.json')
    if osp.exists(ann_file):
        with open(ann_file) as f:
            if len(json.load(f)['images']) == num_images:
                return target
    os.makedirs(osp.join(target, 'train'), exist_ok=True)
    os.makedirs(osp.join(target, 'annotations'), exist_ok=True)
    with open(osp.join(source, 'annotations', 'instances_train.json')) as f:
        coco = json.load(f)
    scale_of = {}
    for image in coco['images']:
        scale = long_side / max(image['width'], image['height'])
        scale_of[image['id']] = scale
        width, height = round(image['width'] * scale), round(image['height'] * scale)
        pixels = Image.open(osp.join(source, 'train', image['file_name'])).convert('RGB')
        pixels.resize((width, height), Image.BICUBIC).save(osp.join(target, 'train', image['file_name']))
        image.update(width=width, height=height)
    for ann in coco['annotations']:
        scale = scale_of[ann['image_id']]
        ann['segmentation'] = [[v * scale for v in ring] for ring in ann['segmentation']]
        ann['bbox'] = [v * scale for v in ann['bbox']]
        ann['area'] = ann['area'] * scale * scale
    with open(ann_file, 'w') as f:
        json.dump(coco, f)
    return target


def build_dataset(data_root, pipeline):
    from mmdet.datasets import CocoDataset
    return CocoDataset(
        data_root=data_root, ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
        metainfo=dict(classes=('circle', 'triangle', 'rectangle', 'ellipse', 'star')),
        filter_cfg=None, pipeline=pipeline, serialize_data=False)


class Timed:
    """A pipeline step that adds its wall time to a shared per-step total."""

    def __init__(self, transform, totals):
        self.transform, self.totals = transform, totals
        self.name = type(transform).__name__

    def __call__(self, results):
        start = time.perf_counter()
        out = self.transform(results)
        self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - start
        return out


def reseed(index):
    np.random.seed(index)
    random.seed(index)


def measure(datasets, num_images, repeats):
    """Per provider: time per image over ``repeats`` passes, then one traced pass for memory.

    Providers take turns image by image, so a change in machine load (this machine is shared)
    falls on all of them alike.
    """
    for dataset in datasets.values():
        for i in range(min(3, num_images)):  # warm-up: imports, caches, first-call costs
            reseed(i)
            dataset[i]
    steps = {name: {} for name in datasets}
    for name, dataset in datasets.items():
        dataset.pipeline.transforms = [Timed(t, steps[name]) for t in dataset.pipeline.transforms]
    times = {name: [] for name in datasets}
    instances = dict.fromkeys(datasets, 0)
    for _ in range(repeats):
        for i in range(num_images):
            for name, dataset in datasets.items():
                reseed(i)
                start = time.perf_counter()
                out = dataset[i]
                times[name].append(time.perf_counter() - start)
                instances[name] += len(out['data_samples'].gt_instances)
    peaks = {name: [] for name in datasets}
    for name, dataset in datasets.items():
        dataset.pipeline.transforms = [t.transform for t in dataset.pipeline.transforms]
    tracemalloc.start()
    for i in range(num_images):
        for name, dataset in datasets.items():
            reseed(i)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            out = dataset[i]
            peaks[name].append(tracemalloc.get_traced_memory()[1] - base)
            del out
    tracemalloc.stop()
    results = {}
    for name in datasets:
        t, n = times[name], len(times[name])
        results[name] = dict(
            ms_per_image_median=1e3 * statistics.median(t),
            ms_per_image_mean=1e3 * statistics.fmean(t),
            ms_per_image_p90=1e3 * float(np.percentile(t, 90)),
            # What the mask representation changes: everything but decoding the image file.
            ms_per_image_mean_after_decode=1e3 * (sum(t) - steps[name]['LoadImageFromFile']) / n,
            peak_mib_median=statistics.median(peaks[name]) / 2**20,
            peak_mib_max=max(peaks[name]) / 2**20,
            instances_per_image=instances[name] / n,
            ms_per_image_by_step={k: 1e3 * v / n for k, v in steps[name].items()},
        )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num-images', type=int, default=40)
    parser.add_argument('--repeats', type=int, default=2, help='timed passes over the images')
    parser.add_argument('--work-dir', default='work_dirs/benchmark_pipeline')
    parser.add_argument('--out', default=None, help='JSON file (default: WORK_DIR/results.json)')
    parser.add_argument('--providers', nargs='+', default=list(PROVIDERS), choices=list(PROVIDERS))
    args = parser.parse_args()

    from mmdet.utils import register_all_modules
    register_all_modules()
    import projects.vim_disc  # noqa: F401  (registers SeedFromStreamPosition and PolygonRandomCrop)

    data_root = scaled_shapes_copy(args.work_dir, args.num_images)
    datasets = {name: build_dataset(data_root, PROVIDERS[name]) for name in args.providers}
    results = measure(datasets, args.num_images, args.repeats)

    header = f"{'provider':<15}{'ms/img med':>12}{'ms/img mean':>13}{'ms/img p90':>12}" \
             f"{'mean w/o decode':>17}{'peak MiB med':>14}{'peak MiB max':>14}{'inst/img':>10}"
    print(f'LSJ pipeline at {IMAGE_SIZE[0]}, {args.num_images} shapes images (long side 1024), '
          f'{args.repeats} timed passes')
    print(header)
    for name, r in results.items():
        print(f"{name:<15}{r['ms_per_image_median']:>12.1f}{r['ms_per_image_mean']:>13.1f}"
              f"{r['ms_per_image_p90']:>12.1f}{r['ms_per_image_mean_after_decode']:>17.1f}"
              f"{r['peak_mib_median']:>14.1f}{r['peak_mib_max']:>14.1f}"
              f"{r['instances_per_image']:>10.2f}")
    print('mean ms per image by step:')
    for name, r in results.items():
        print(f'  {name:<15}' + '  '.join(f'{k} {v:.1f}' for k, v in r['ms_per_image_by_step'].items()))
    out = args.out or osp.join(args.work_dir, 'results.json')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(dict(image_size=IMAGE_SIZE, num_images=args.num_images, repeats=args.repeats,
                       machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                       results=results), f, indent=2)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()

"""Mask accuracy of polygon crops: mmdet's ``PolygonMasks.crop`` vs ours, against rasterise-then-crop.

    python benchmarks/benchmark_polygon_crop.py [--instances 1000] [--seed 0] [--out crop_accuracy.json]

Random instances of 1-3 rings with 3-9 vertices (a third with vertices in random order, so mostly
self-intersecting) in a 256 px image, random crop boxes. Reference: rasterise the whole instance with
pycocotools (mmdet's own rasteriser), then crop. Only instances with >= 100 px inside the crop count.
Prints a table and writes JSON.
"""
import argparse
import json

from _bootstrap import setup_repo_path

setup_repo_path()

import numpy as np  # noqa: E402
from mmdet.structures.mask import PolygonMasks  # noqa: E402

from projects.vim_disc.datasets.transforms import RobustPolygonMasks  # noqa: E402

SIZE = 256


def random_instance(rng):
    rings, self_intersecting = [], False
    for _ in range(rng.integers(1, 4)):
        n = rng.integers(3, 10)
        centre = rng.uniform(40, SIZE - 40, 2)
        radius = rng.uniform(10, 70)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        if rng.random() < 1 / 3:  # vertex order scrambled: a self-intersecting ring
            angles = rng.permutation(angles)
            self_intersecting = True
        pts = centre + radius * rng.uniform(0.4, 1.0, (n, 1)) * np.stack([np.cos(angles), np.sin(angles)], 1)
        rings.append(np.clip(pts, 0, SIZE).reshape(-1))
    return rings, self_intersecting


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--instances', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out')
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = {'mmdet PolygonMasks.crop': [], 'ours (RobustPolygonMasks.crop)': []}
    flags = []
    while len(flags) < args.instances:
        rings, self_intersecting = random_instance(rng)
        x1, y1 = rng.uniform(0, SIZE * 0.6, 2)
        box = np.array([x1, y1, x1 + rng.uniform(40, SIZE - x1), y1 + rng.uniform(40, SIZE - y1)]).astype(int)
        full = PolygonMasks([rings], SIZE, SIZE).to_ndarray()[0]
        reference = full[box[1]:box[3], box[0]:box[2]]
        if reference.sum() < 100:
            continue
        flags.append(self_intersecting)
        for name, cls in zip(rows, (PolygonMasks, RobustPolygonMasks)):
            cropped = cls([rings], SIZE, SIZE).crop(box.astype(np.float64)).to_ndarray()[0]
            rows[name].append(iou(cropped, reference))
    flags = np.array(flags)
    results = {}
    print(f'{"crop":<32} {"IoU<0.9":>8} {"IoU<0.5":>8} {"self-int. IoU<0.9":>18} {"mean IoU":>9}')
    for name, ious in rows.items():
        ious = np.array(ious)
        r = dict(instances=len(ious), below_0_9=float((ious < 0.9).mean()), below_0_5=float((ious < 0.5).mean()),
                 self_intersecting_below_0_9=float((ious[flags] < 0.9).mean()), mean_iou=float(ious.mean()))
        results[name] = r
        print(f'{name:<32} {r["below_0_9"]:8.1%} {r["below_0_5"]:8.1%} {r["self_intersecting_below_0_9"]:18.1%} '
              f'{r["mean_iou"]:9.3f}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(seed=args.seed, results=results), f, indent=1)


if __name__ == '__main__':
    main()

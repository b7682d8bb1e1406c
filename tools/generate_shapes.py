"""Generate the synthetic shapes dataset explicitly (``ShapesDataset`` also does it on first use).

    python tools/generate_shapes.py [--root data/shapes] [--seed 0] [--num-train 400] [--num-val 100] [--force]

A dataset already on disk with the same arguments is left alone unless ``--force`` is given.
"""
import argparse
import os
import sys
import time

# `python tools/x.py` puts tools/ on sys.path, not the repository root that holds `projects`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from projects.vim_disc.datasets.shapes import generate_shapes_dataset  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default='data/shapes', help='output directory')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--min-size', type=int, default=128, help='smallest image side (px)')
    parser.add_argument('--max-size', type=int, default=256, help='largest image side (px)')
    parser.add_argument('--force', action='store_true', help='rebuild even if an identical dataset exists')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    info = generate_shapes_dataset(args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                   min_size=args.min_size, max_size=args.max_size, force=args.force)
    verb = f'built in {time.perf_counter() - start:.1f} s' if info['generated'] else 'already up to date'
    counts = ', '.join(f"{split}: {c['images']} images, {c['instances']} instances"
                       for split, c in info['counts'].items())
    print(f'{os.path.abspath(args.root)} {verb} (seed {info["seed"]}; {counts})')


if __name__ == '__main__':
    main()

"""Draw what the training pipeline really produces: images after every transform, with their boxes and masks.

``python tools/analysis/browse_dataset.py CONFIG [--output-dir DIR] [--num N] [--seed S] [--montage PNG]
[--cfg-options key=value ...]``

Builds ``train_dataloader.dataset`` of the config (its pipeline included: LSJ resize, the polygon-safe crop,
padding, ...), takes the first N items (random transforms seeded by --seed) and draws each item's ground truth
with mmdet's ``DetLocalVisualizer`` into DIR/<index>_<image name>.png. ``--montage`` also tiles them into one
PNG (the picture in the docs). ``--pipeline-from OTHER`` swaps in another config's training pipeline, e.g. to
see the COCO LSJ pipeline (resize 0.1-2x, polygon-safe crop, pad) act on the demo's small shapes images.
"""
import argparse
import math
import os
import os.path as osp
import random
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from PIL import Image  # noqa: E402


def use_train_pipeline_of(cfg, other_config):
    """Replace cfg's training pipeline by another config's (e.g. the COCO LSJ one on the demo's shapes data)."""
    other = Config.fromfile(other_config)
    pipeline = other.get('train_pipeline', None) or other.train_dataloader.dataset.pipeline
    cfg.train_dataloader.dataset.pipeline = pipeline
    return cfg


def build_train_dataset(cfg):
    """The config's training dataset with its pipeline (registers mmdet and projects.vim_disc first)."""
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    import projects.vim_disc  # noqa: F401  (VimBackbone, ShapesDataset, PolygonRandomCrop, ...)
    from mmdet.registry import DATASETS
    return DATASETS.build(cfg.train_dataloader.dataset)


def ground_truth(item):
    """(rgb image HxWx3 uint8, boxes (n, 4) xyxy, masks (n, H, W) bool, labels (n,)) of one pipeline output."""
    from mmdet.models.utils import mask2ndarray
    from mmdet.structures.bbox import BaseBoxes
    img = item['inputs'].permute(1, 2, 0).numpy()[..., ::-1]  # the pipeline keeps cv2's BGR
    gt = item['data_samples'].gt_instances
    boxes = gt.get('bboxes', None)
    if isinstance(boxes, BaseBoxes):
        boxes = boxes.tensor
    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
    masks = gt.get('masks', None)
    masks = (np.zeros((0, *img.shape[:2]), bool) if masks is None or len(masks) == 0
             else mask2ndarray(masks).astype(bool))
    return np.ascontiguousarray(img), boxes, masks, np.asarray(gt.labels)


def draw_item(visualizer, item, out_file):
    """Draw one item's boxes and masks; returns what was drawn (paths, arrays) for checking."""
    from mmengine.structures import InstanceData
    img, boxes, masks, labels = ground_truth(item)
    sample = item['data_samples'].clone()
    sample.gt_instances = InstanceData(bboxes=torch.from_numpy(boxes), masks=masks, labels=torch.as_tensor(labels))
    name = osp.basename(sample.img_path)
    visualizer.add_datasample(name, img, sample, draw_pred=False, show=False, out_file=out_file)
    return dict(path=out_file, image=img, boxes=boxes, masks=masks, labels=labels, img_path=sample.img_path)


def browse(cfg, output_dir, num=8, seed=0):
    """Draw the first `num` pipeline outputs of the training dataset into `output_dir`; returns draw_item's dicts."""
    from mmdet.visualization import DetLocalVisualizer
    dataset = build_train_dataset(cfg)
    # mmcv's random transforms draw from numpy's and python's global generators
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    visualizer = DetLocalVisualizer(name=f'browse_dataset_{id(dataset)}')
    visualizer.dataset_meta = dataset.metainfo
    os.makedirs(output_dir, exist_ok=True)
    drawn = []
    for index in range(min(num, len(dataset))):
        item = dataset[index]
        name = osp.splitext(osp.basename(item['data_samples'].img_path))[0]
        drawn.append(draw_item(visualizer, item, osp.join(output_dir, f'{index:04d}_{name}.png')))
    return drawn


def montage(paths, out, ncols=4, tile=256, gap=4, colors=256):
    """Tile images (each scaled to fit a tile x tile cell, aspect kept) into one PNG on a white background.

    ``colors``: quantise to an adaptive palette of this many colours (0: keep RGB); keeps docs images small.
    """
    rows = math.ceil(len(paths) / ncols)
    cols = min(ncols, len(paths))
    sheet = Image.new('RGB', (cols * tile + (cols - 1) * gap, rows * tile + (rows - 1) * gap), 'white')
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert('RGB')
            im.thumbnail((tile, tile), Image.LANCZOS) if max(im.size) > tile else None
            if max(im.size) < tile:  # small demo images: enlarge for reading, nearest keeps the drawn lines crisp
                scale = tile / max(im.size)
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST)
            r, c = divmod(i, ncols)
            sheet.paste(im, (c * (tile + gap) + (tile - im.width) // 2, r * (tile + gap) + (tile - im.height) // 2))
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    if colors:
        sheet = sheet.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    sheet.save(out, optimize=True)
    return sheet


def parse_args():
    parser = argparse.ArgumentParser(description='Draw the training pipeline output (boxes and masks) to a folder')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--output-dir', default='work_dirs/browse_dataset', help='folder for the drawn images')
    parser.add_argument('--num', type=int, default=8, help='how many items to draw')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random transforms')
    parser.add_argument('--montage', help='also tile the drawn images into this PNG')
    parser.add_argument('--montage-cols', type=int, default=4)
    parser.add_argument('--montage-tile', type=int, default=256)
    parser.add_argument('--montage-colors', type=int, default=256, help='palette size of the montage (0: RGB)')
    parser.add_argument('--pipeline-from', metavar='CONFIG',
                        help="use this config's train pipeline instead (applied before --cfg-options)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value (xxx=yyy format)')
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.pipeline_from:
        use_train_pipeline_of(cfg, args.pipeline_from)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    drawn = browse(cfg, args.output_dir, args.num, args.seed)
    for d in drawn:
        print(f'{d["path"]}: {len(d["boxes"])} instances, {d["image"].shape[1]}x{d["image"].shape[0]} px '
              f'(from {osp.relpath(d["img_path"])})')
    if args.montage:
        montage([d['path'] for d in drawn], args.montage, args.montage_cols, args.montage_tile,
                colors=args.montage_colors)
        print(f'wrote {args.montage}')


if __name__ == '__main__':
    main()

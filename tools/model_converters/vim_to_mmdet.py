"""Convert an official Vim ImageNet checkpoint into a weights-only ``VimBackbone`` checkpoint.

    python tools/model_converters/vim_to_mmdet.py checkpoints/vim_t_midclstok_76p1acc.pth \\
        checkpoints/vim_t_midclstok_76p1acc_backbone.pth [--arch tiny] [--img-size 1024]

The result holds only the backbone's tensors (``{'state_dict': ..., 'meta': ...}``): no class token, classifier,
final norm, rope buffers, optimizer state or training ``args``, so it loads under ``torch.load(weights_only=True)``
and is smaller. ``VimBackbone``'s ``init_cfg=dict(type='Pretrained', checkpoint=...)`` accepts both
the release and this file. The position grid stays at the checkpoint's 14 x 14 unless ``--img-size`` is given
(the backbone interpolates it to its own grid when loading anyway).
"""
import argparse
import hashlib
import os
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from projects.vim_disc.models.checkpoint_convert import (  # noqa: E402
    checkpoint_arch, convert_vim_state_dict, load_vim_checkpoint, unwrap_state_dict)
from projects.vim_disc.models.vim import VimBackbone  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description='Official Vim checkpoint -> VimBackbone weights')
    parser.add_argument('src', help='official checkpoint (path or URL)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--arch', choices=sorted(VimBackbone.arch_zoo),
                        help='expected architecture; the conversion fails if the checkpoint is another one')
    parser.add_argument('--img-size', type=int, help='resize the position grid to img-size / patch-size')
    parser.add_argument('--patch-size', type=int, default=16)
    return parser.parse_args()


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def main():
    args = parse_args()
    state_dict = unwrap_state_dict(load_vim_checkpoint(args.src))
    embed_dims, depth = checkpoint_arch(state_dict)
    if args.arch is not None:
        expected = VimBackbone.arch_zoo[args.arch]
        embed_dims, depth = expected['embed_dims'], expected['depth']
    # None keeps the release's grid (14 x 14): the backbone interpolates to its own grid when it loads
    grid = None if args.img_size is None else (args.img_size // args.patch_size, ) * 2
    converted = convert_vim_state_dict(state_dict, grid, depth, embed_dims)
    pos_tokens = converted['pos_embed'].shape[1]
    meta = dict(source=osp.basename(args.src), embed_dims=embed_dims, depth=depth, pos_tokens=pos_tokens)
    if osp.isfile(args.src):
        meta['source_sha256'] = sha256(args.src)
    os.makedirs(osp.dirname(osp.abspath(args.dst)), exist_ok=True)
    torch.save(dict(state_dict=converted, meta=meta), args.dst)
    params = sum(v.numel() for v in converted.values())
    print(f'wrote {args.dst}: {len(converted)} tensors, {params / 1e6:.2f} M values, embed_dims={embed_dims}, '
          f'depth={depth}, {pos_tokens} patch positions')


if __name__ == '__main__':
    main()

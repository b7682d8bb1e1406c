"""Official Vim ImageNet checkpoints -> ``VimBackbone`` state dicts.

The release (``vim_t_midclstok_76p1acc.pth`` and friends) stores ``{'model': state_dict, ...}`` with
``pos_embed`` of shape (1, 197, C): 196 patch positions (14 x 14, row-major) and the class token's position
inserted in the MIDDLE, at index 196 // 2 = 98 (``use_middle_cls_token``). A detection backbone has no class
token and a larger grid, so the class token's embedding is removed at its real index, the remaining 196 are
laid out 14 x 14 and interpolated bicubically to the training grid. ``cls_token``, ``head.*`` (ImageNet
classifier), ``norm_f.*`` (final norm: the backbone outputs hidden + residual without it) and ``rope.*``
(fixed rotary buffers, recomputed for the grid if ever used) are dropped.

Pure functions on dicts of tensors: ``VimBackbone.init_weights`` and ``tools/model_converters/vim_to_mmdet.py``
both call them.
"""
import argparse
import math
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

# keys of the classification model that have no place in the detection backbone
DROPPED_PREFIXES = ('head.', 'norm_f.', 'rope.')
CLASS_TOKEN_KEYS = ('cls_token', 'cls_token_head', 'cls_token_tail', 'dist_token')
_LAYER_KEY = re.compile(r'^layers\.(\d+)\.')


def load_vim_checkpoint(filename: str, map_location='cpu') -> dict:
    """Read a Vim checkpoint (path or URL) with ``weights_only=True``.

    Checkpoints saved by Vim's ``main.py`` also hold the training ``args`` (an ``argparse.Namespace``), which a
    weights-only unpickler refuses; a Namespace only carries plain values, so it is the one extra type allowed.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    with torch.serialization.safe_globals([argparse.Namespace]):
        return CheckpointLoader.load_checkpoint(filename, map_location=map_location)


def unwrap_state_dict(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The model weights inside a checkpoint file: Vim's ``model``, mmengine's ``state_dict``, or the dict itself."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def checkpoint_arch(state_dict: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """(embed_dims, depth) of a Vim state dict, read from the patch embedding and the ``layers.{i}`` keys."""
    if 'patch_embed.proj.weight' not in state_dict:
        raise KeyError('not a Vim state dict: no "patch_embed.proj.weight" '
                       f'(first keys: {sorted(state_dict)[:8]})')
    embed_dims = state_dict['patch_embed.proj.weight'].shape[0]
    layer_ids = {int(m.group(1)) for m in map(_LAYER_KEY.match, state_dict) if m}
    depth = max(layer_ids) + 1 if layer_ids else 0
    missing = sorted(set(range(depth)) - layer_ids)
    if missing:
        raise ValueError(f'Vim state dict has layers.0-{depth - 1} with gaps: no weights for layers {missing}')
    return embed_dims, depth


def patch_position_embeddings(pos_embed: torch.Tensor, has_class_token: bool,
                              cls_token_index: Optional[int] = None) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Drop the class token's position embedding; return (1, H*W, C) patch positions and their grid (H, W).

    The official models insert the class token at ``num_patches // 2`` (Vim's ``token_position = M // 2``), so
    its embedding sits there, not at index 0 as in ViT/DeiT.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f'pos_embed must be (1, tokens, C), got {tuple(pos_embed.shape)}')
    num_tokens = pos_embed.shape[1]
    num_patches = num_tokens - 1 if has_class_token else num_tokens
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f'pos_embed has {num_tokens} tokens ({"with" if has_class_token else "without"} a class '
                         f'token): {num_patches} patch positions do not form a square grid')
    if has_class_token:
        index = num_patches // 2 if cls_token_index is None else cls_token_index
        if not 0 <= index < num_tokens:
            raise ValueError(f'cls_token_index {index} outside the {num_tokens} position embeddings')
        pos_embed = torch.cat([pos_embed[:, :index], pos_embed[:, index + 1:]], dim=1)
    return pos_embed, (side, side)


def resize_position_embeddings(pos_embed: torch.Tensor, src_hw: Sequence[int],
                               dst_hw: Sequence[int]) -> torch.Tensor:
    """Bicubic resize of row-major (1, H*W, C) patch position embeddings from grid ``src_hw`` to ``dst_hw``."""
    src_hw, dst_hw = tuple(src_hw), tuple(dst_hw)
    if src_hw == dst_hw:
        return pos_embed
    channels = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, *src_hw, channels).permute(0, 3, 1, 2)
    # interpolate in fp32: bicubic on half tensors is not implemented on CPU and loses precision
    grid = F.interpolate(grid.float(), size=dst_hw, mode='bicubic', align_corners=False)
    return grid.to(pos_embed.dtype).flatten(2).transpose(1, 2).contiguous()


def convert_vim_state_dict(state_dict: Dict[str, torch.Tensor],
                           num_patches_hw: Optional[Sequence[int]],
                           num_layers: int,
                           embed_dims: int,
                           logger=None,
                           cls_token_index: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Turn an official Vim state dict into one for ``VimBackbone`` with a ``num_patches_hw`` position grid.

    Args:
        state_dict: the checkpoint's weights (a whole checkpoint with a ``model``/``state_dict`` entry is
            unwrapped). Accepts the release layout (197 positions, middle class token) and already converted
            ones (a square number of positions, no ``cls_token``), so converting twice is harmless.
        num_patches_hw: (H, W) patch grid of the backbone's ``pos_embed``; None keeps the checkpoint's grid.
        num_layers, embed_dims: the backbone's depth and width; a checkpoint that differs raises ValueError
            naming both values.
        logger: a logger or name for ``mmengine.logging.print_log`` (None: the current MMLogger).
        cls_token_index: where the class token's position embedding is (default: the middle, as released).

    Returns:
        A new dict; the input is not modified.
    """
    logger = 'current' if logger is None else logger
    state_dict = unwrap_state_dict(state_dict)
    ckpt_dims, ckpt_depth = checkpoint_arch(state_dict)
    mismatches = []
    if ckpt_dims != embed_dims:
        mismatches.append(f'width: checkpoint embed_dims={ckpt_dims} (patch_embed.proj.weight '
                          f'{tuple(state_dict["patch_embed.proj.weight"].shape)}), backbone embed_dims={embed_dims}')
    if ckpt_depth != num_layers:
        mismatches.append(f'depth: checkpoint has {ckpt_depth} layers (layers.0-{ckpt_depth - 1}), '
                          f'backbone depth={num_layers}')
    if mismatches:
        raise ValueError('Vim checkpoint does not fit the backbone (pick the matching arch or checkpoint: '
                         'tiny 192 x 24, small 384 x 24, base 768 x 24): ' + '; '.join(mismatches))

    converted, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(DROPPED_PREFIXES) or key in CLASS_TOKEN_KEYS:
            dropped.append(key)
        else:
            converted[key] = value

    if 'pos_embed' in converted:
        has_class_token = any(k in state_dict for k in CLASS_TOKEN_KEYS)
        pos_embed, src_hw = patch_position_embeddings(converted['pos_embed'], has_class_token, cls_token_index)
        if pos_embed.shape[-1] != embed_dims:
            raise ValueError(f'width: checkpoint pos_embed has {pos_embed.shape[-1]} channels, '
                             f'backbone embed_dims={embed_dims}')
        dst_hw = src_hw if num_patches_hw is None else tuple(num_patches_hw)
        converted['pos_embed'] = resize_position_embeddings(pos_embed, src_hw, dst_hw)
        token_note = ' without the class token' if has_class_token else ''
        resize_note = 'kept' if dst_hw == src_hw else f'-> {dst_hw} (bicubic)'
        print_log(f'Vim checkpoint: pos_embed {tuple(state_dict["pos_embed"].shape)} -> grid {src_hw}'
                  f'{token_note} {resize_note}', logger=logger)
    else:
        print_log('Vim checkpoint has no pos_embed; the backbone keeps its own initialisation', logger=logger)
    print_log(f'Vim checkpoint: dropped {len(dropped)} classification-only keys: {sorted(dropped)}', logger=logger)
    return converted


def load_converted_state_dict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], logger=None):
    """``module.load_state_dict(state_dict, strict=False)`` that logs the missing and unexpected keys."""
    result = module.load_state_dict(state_dict, strict=False)
    print_log(f'Vim checkpoint: missing keys: {result.missing_keys or "none"}; '
              f'unexpected keys: {result.unexpected_keys or "none"}',
              logger='current' if logger is None else logger)
    return result

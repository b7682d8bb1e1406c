"""Layer-wise learning-rate decay for Vim detectors (BEiT / ViTDet recipe, Vim's layer numbering).

Layer ids: the patch and position embeddings are layer 0, ``backbone.layers.i`` is layer i + 1 and everything
else (neck, RPN and RoI heads) is the top, layer num_layers + 1. A parameter of layer l trains at
``lr * decay_rate ** (num_layers + 1 - l)``: the top at the base lr, the embeddings at the smallest.

Weight decay is off for the position embedding, every norm, every bias, and the SSM's ``A_log``/``A_b_log`` and
``D``/``D_b`` (mamba-ssm marks these ``_no_weight_decay``: decaying ``A_log`` pulls every state's decay rate to
the same value, decaying ``D`` removes the skip path).
"""
import re
from typing import List, Optional

import torch.nn as nn
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor

from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS

EMBEDDING_NAMES = ('pos_embed', 'cls_token')
SSM_NO_DECAY_NAMES = ('A_log', 'A_b_log', 'D', 'D_b')
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
               nn.LocalResponseNorm)


def get_layer_id_for_vim(name: str, num_layers: int, prefix: str = 'backbone.') -> int:
    """Layer id of parameter ``name``: 0 for the embeddings, i + 1 for ``layers.i``, num_layers + 1 otherwise."""
    if not name.startswith(prefix):
        return num_layers + 1
    local = name[len(prefix):]
    if local.startswith('patch_embed.') or local in EMBEDDING_NAMES:
        return 0
    match = re.match(r'layers\.(\d+)\.', local)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def is_norm(module: nn.Module) -> bool:
    # RMSNorm and LN2d are plain nn.Modules, so also go by the class name
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or 'Norm' in name or name.startswith('LN')


def no_weight_decay_reason(param_name: str, param: nn.Parameter, owner: nn.Module) -> Optional[str]:
    """Why ``param`` (``param_name`` inside ``owner``) takes no weight decay, or None when it does."""
    leaf = param_name.rsplit('.', 1)[-1]
    if getattr(param, '_no_weight_decay', False):
        return 'marked _no_weight_decay'
    if leaf in EMBEDDING_NAMES:
        return leaf
    if leaf in SSM_NO_DECAY_NAMES:
        return f'ssm {leaf}'
    if is_norm(owner):
        return 'norm'
    if leaf == 'bias':
        return 'bias'
    return None


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class VimLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups with layer-wise lr decay over a Vim backbone; no weight decay where it does harm.

    ``paramwise_cfg``:
        decay_rate (float): the per-layer lr factor (0.837 for Vim-T: 24 layers).
        num_layers (int, optional): the backbone depth; counted from ``backbone.layers.*`` when absent, and
            checked against the model when given.
        backbone_prefix (str): where the backbone's parameters live (default ``'backbone.'``).

    One group per (layer id, decay / no decay). Groups are ordered from the top layer down so that the first
    group, the one mmengine logs as ``lr``, follows the base schedule.
    """

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        decay_rate = float(cfg['decay_rate'])
        prefix = cfg.get('backbone_prefix', 'backbone.')
        num_layers = self._num_layers(module, prefix, cfg.get('num_layers'))

        # names stay out of the groups: torch treats a 'param_names' key as naming every group of the optimizer
        groups, names = {}, {}
        for owner_name, owner in module.named_modules():
            for local_name, param in owner.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                name = f'{owner_name}.{local_name}' if owner_name else local_name
                layer_id = get_layer_id_for_vim(name, num_layers, prefix)
                reason = no_weight_decay_reason(name, param, owner)
                key = (layer_id, reason is None)
                if key not in groups:
                    lr_scale = decay_rate**(num_layers + 1 - layer_id)
                    groups[key] = dict(
                        params=[], layer_id=layer_id, lr_scale=lr_scale, lr=self.base_lr * lr_scale,
                        weight_decay=self.base_wd if reason is None else 0.0,
                        group_name=f'layer_{layer_id}_{"decay" if reason is None else "no_decay"}')
                    names[key] = []
                groups[key]['params'].append(param)
                names[key].append(name if reason is None else f'{name} ({reason})')

        order = sorted(groups, key=lambda k: (-k[0], not k[1]))
        if get_dist_info()[0] == 0:
            self._log_groups([groups[k] for k in order], [names[k] for k in order], num_layers, decay_rate)
        params.extend(groups[k] for k in order)

    @staticmethod
    def _num_layers(module: nn.Module, prefix: str, configured: Optional[int]) -> int:
        pattern = re.compile(re.escape(prefix) + r'layers\.(\d+)\.')
        ids = {int(m.group(1)) for m in (pattern.match(n) for n, _ in module.named_parameters()) if m}
        if not ids:
            raise ValueError(f'layer-wise lr decay: the model has no "{prefix}layers.<i>." parameters '
                             '(is the backbone a VimBackbone, and is backbone_prefix right?)')
        counted = max(ids) + 1
        if configured is not None and int(configured) != counted:
            raise ValueError(f'layer-wise lr decay: paramwise_cfg num_layers={configured} but the backbone has '
                             f'{counted} layers; drop num_layers to count them from the model')
        return counted

    def _log_groups(self, groups: List[dict], names: List[List[str]], num_layers: int, decay_rate: float) -> None:
        lines = [f'VimLayerDecayOptimizerConstructor: {len(groups)} parameter groups, {num_layers} backbone '
                 f'layers, decay_rate={decay_rate}, base lr={self.base_lr}, base weight_decay={self.base_wd}']
        for g, group_names in zip(groups, names):
            lines.append(f'  {g["group_name"]}: lr_scale={g["lr_scale"]:.6g} lr={g["lr"]:.6g} '
                         f'weight_decay={g["weight_decay"]} params={len(g["params"])}: {", ".join(group_names)}')
        print_log('\n'.join(lines), logger='current')

"""ViTDet's simple feature pyramid: a multi-scale pyramid built from ONE plain-backbone feature map."""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_norm_layer
from mmengine.model import BaseModule

from mmdet.registry import MODELS


@MODELS.register_module()
class LN2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW map (ViTDet's norm for necks and heads)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.normalized_shape = (num_channels, )

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


@MODELS.register_module()
class SimpleFPN(BaseModule):
    """Pyramid levels by up/down-sampling the backbone map, then lateral + 3x3 convs, plus max-pooled extra levels.

    Args:
        backbone_channel (int): channels of the backbone map.
        in_channels (list[int]): channels after each rescaling branch (ViTDet: C/4, C/2, C, C).
        out_channels (int): channels of every output level.
        num_outs (int): outputs; levels past ``len(scale_factors)`` are max-pooled from the last one.
        scale_factors (tuple[float]): rescaling of each branch; (4, 2, 1, 0.5) turns a stride-16 map into
            strides 4..32. Supported factors: 4, 2, 1, 0.5, 0.25.
    """

    def __init__(self,
                 backbone_channel: int,
                 in_channels: Sequence[int],
                 out_channels: int,
                 num_outs: int,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 conv_cfg=None,
                 norm_cfg=None,
                 act_cfg=None,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if len(in_channels) != len(scale_factors):
            raise ValueError(f'in_channels {list(in_channels)} needs one entry per scale factor {list(scale_factors)}')
        if num_outs < len(scale_factors):
            raise ValueError(f'num_outs={num_outs} < {len(scale_factors)} pyramid branches')
        self.num_outs = num_outs
        self.branches = nn.ModuleList(
            self._rescale_branch(backbone_channel, c, f, norm_cfg) for c, f in zip(in_channels, scale_factors))
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg, inplace=False)
            for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                       act_cfg=act_cfg, inplace=False) for _ in in_channels)

    @staticmethod
    def _rescale_branch(c_in: int, c_out: int, factor: float, norm_cfg) -> nn.Module:
        def up2(ci, co):
            return nn.ConvTranspose2d(ci, co, 2, stride=2)

        if factor == 4.0:
            mid = c_in // 2
            norm = build_norm_layer(norm_cfg, mid)[1] if norm_cfg else nn.Identity()
            branch = nn.Sequential(up2(c_in, mid), norm, nn.GELU(), up2(mid, c_out))
        elif factor == 2.0:
            branch = up2(c_in, c_out)
        elif factor == 1.0:
            branch = nn.Identity()
        elif factor == 0.5:
            branch = nn.MaxPool2d(2, 2)
        elif factor == 0.25:
            branch = nn.MaxPool2d(4, 4)
        else:
            raise ValueError(f'unsupported scale factor {factor}; use 4, 2, 1, 0.5 or 0.25')
        # identity and pooling keep the channel count, so the configured width must match it
        if factor <= 1.0 and c_out != c_in:
            raise ValueError(f'scale factor {factor} keeps {c_in} channels, but in_channels says {c_out}')
        return branch

    def forward(self, inputs):
        x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        outs = [fpn(lat(branch(x))) for branch, lat, fpn in zip(self.branches, self.lateral_convs, self.fpn_convs)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)

"""Vision Mamba (Vim) backbone for dense prediction, with a pluggable SSM discretization rule.

Layout and parameter names follow the official Vim release ("bimamba v2") so its ImageNet checkpoints load:
``patch_embed.proj``, ``pos_embed``, ``layers.{i}.norm``, ``layers.{i}.mixer.{in_proj, conv1d(_b), x_proj(_b),
dt_proj(_b), A_log / A_b_log, D / D_b, out_proj}``. The selective scan itself lives in ``kernels/``.
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_

from kernels import selective_scan_fn
from mmdet.registry import MODELS
from .discretizers import build_discretizer

DEFAULT_SSM_CFG = dict(d_state=16, d_conv=4, expand=2, dt_rank='auto', dt_min=0.001, dt_max=0.1,
                       dt_init_floor=1e-4, dt_scale=1.0, dt_init='random')


class RMSNorm(nn.Module):
    """RMSNorm as in mamba-ssm (computed in fp32, cast back)."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; ``proj`` matches the official key ``patch_embed.proj``."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)
        hw = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), hw


def init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """mamba-ssm's dt initialisation: dt ~ log-uniform[dt_min, dt_max], floored, stored as softplus^-1(dt)."""
    with torch.no_grad():
        dt = torch.exp(torch.rand(bias.shape[0], device=bias.device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        # inverse of softplus, so that softplus(bias) == dt at init
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer (bimamba v2).

    Shared ``in_proj`` / ``out_proj``; per direction its own causal depthwise conv, ``x_proj``, ``dt_proj``, ``A`` and
    ``D``. The backward direction scans the flipped sequence; the two outputs are averaged before ``out_proj``
    (Vim's ``if_divide_out``). Both directions use the same discretization rule.

    The backward direction is computed on the un-flipped sequence (no flip copies of (B, D, L) tensors): its
    causal conv of the flipped sequence is an anti-causal conv with the kernel reversed, the projections are
    per token, and the scan runs with ``reverse=True``; the result equals Vim's flip -> scan -> flip.
    """

    def __init__(self, d_model: int, ssm_cfg: dict, discretizer, layer_idx: int = 0):
        super().__init__()
        cfg = {**DEFAULT_SSM_CFG, **(ssm_cfg or {})}
        unknown = set(cfg) - set(DEFAULT_SSM_CFG)
        if unknown:
            raise ValueError(f'unknown ssm_cfg keys {sorted(unknown)}; valid: {sorted(DEFAULT_SSM_CFG)}')
        self.ssm_cfg = cfg
        self.d_model = d_model
        self.d_state = cfg['d_state']
        self.d_conv = cfg['d_conv']
        self.d_inner = int(cfg['expand'] * d_model)
        self.dt_rank = math.ceil(d_model / 16) if cfg['dt_rank'] == 'auto' else int(cfg['dt_rank'])
        self.layer_idx = layer_idx
        self.discretizer = discretizer
        self.record_stats = False  # set by the SSM statistics hook
        self.ssm_stats = None

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for suffix in ('', '_b'):
            setattr(self, 'conv1d' + suffix, nn.Conv1d(self.d_inner, self.d_inner, self.d_conv,
                                                       groups=self.d_inner, padding=self.d_conv - 1))
            setattr(self, 'x_proj' + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False))
            setattr(self, 'dt_proj' + suffix, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            # S4D-real init: A = -(1..N) per channel, stored as log for positivity
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            A_name = 'A_log' if suffix == '' else 'A_b_log'
            setattr(self, A_name, nn.Parameter(torch.log(A)))
            setattr(self, 'D' + suffix, nn.Parameter(torch.ones(self.d_inner)))
        self.reset_dt_proj()

    def reset_dt_proj(self, bias_only: bool = False) -> None:
        """(Re-)initialise both directions' dt_proj exactly as mamba-ssm does, from ``ssm_cfg``."""
        cfg = self.ssm_cfg
        std = self.dt_rank ** -0.5 * cfg['dt_scale']
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            if not bias_only:
                if cfg['dt_init'] == 'constant':
                    nn.init.constant_(dt_proj.weight, std)
                elif cfg['dt_init'] == 'random':
                    nn.init.uniform_(dt_proj.weight, -std, std)
                else:
                    raise ValueError(f"dt_init must be 'constant' or 'random', got {cfg['dt_init']!r}")
            init_dt_bias(dt_proj.bias, cfg['dt_min'], cfg['dt_max'], cfg['dt_init_floor'])

    def _scan(self, xz, conv1d, x_proj, dt_proj, A_log, D, direction: str, reverse: bool = False):
        """One direction on the un-flipped sequence; ``reverse`` runs it from t = L-1 down to 0."""
        L = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        if reverse:
            # the causal conv of the flipped sequence, read in original order, is anti-causal with the kernel
            # reversed: y[t] = sum_k w[K-1-k] x[t+k] + b. Only the small (D, 1, K) weight is flipped, not x.
            K = conv1d.kernel_size[0]
            x = F.conv1d(x, conv1d.weight.flip(-1), conv1d.bias, padding=K - 1,
                         groups=conv1d.groups)[..., K - 1:K - 1 + L]
        else:
            x = conv1d(x)[..., :L]  # causal: keep the first L outputs of the padded conv
        x = F.silu(x)
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # bias goes to the scan as delta_bias
        A = -torch.exp(A_log.float())
        if self.record_stats:  # delta in original order for both directions; the statistics ignore order
            with torch.no_grad():
                stats = self.ssm_stats if self.ssm_stats is not None else {}
                stats[direction] = dict(delta=F.softplus(delta.float() + dt_proj.bias.float()[:, None]),
                                        A=A.detach())
                self.ssm_stats = stats
        return selective_scan_fn(
            x, delta.contiguous(), A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
            z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True, discretization=self.discretizer,
            reverse=reverse)

    def forward(self, hidden):
        """hidden: (B, L, d_model) -> (B, L, d_model)."""
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 * d_inner, L)
        out = self._scan(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, 'fwd')
        # backward direction: a reverse scan of the same xz, its output already in original order (no flips)
        out_b = self._scan(xz, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, 'bwd',
                           reverse=True)
        return self.out_proj(((out + out_b) / 2).transpose(1, 2))


class VimBlock(nn.Module):
    """Pre-norm residual block in Vim's form: the residual stream is carried separately (in fp32)."""

    def __init__(self, dims, ssm_cfg, discretizer, drop_path, residual_in_fp32, norm_eps, layer_idx):
        super().__init__()
        self.norm = RMSNorm(dims, eps=norm_eps)
        self.mixer = BiMambaMixer(dims, ssm_cfg, discretizer, layer_idx)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden, residual):
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()
        return self.mixer(hidden), residual


@MODELS.register_module()
class VimBackbone(BaseModule):
    """Vision Mamba backbone producing one stride-``patch_size`` feature map (hidden + residual, no final norm).

    Args:
        arch (str | dict): 'tiny' (192 x 24), 'small' (384 x 24), 'base' (768 x 24) or
            ``dict(embed_dims=..., depth=...)``.
        img_size (int): the grid the position embedding is stored at (224 for the ImageNet release); it is
            interpolated bicubically to each input's grid.
        ssm_cfg (dict): d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, dt_scale, dt_init.
        discretization (str | dict | Discretizer): the SSM rule, resolved through ``DISCRETIZERS``.
        reinit_dt_after_load (bool | None): after loading a pretrained checkpoint, re-initialise both directions'
            ``dt_proj`` biases from ``ssm_cfg`` (None: on for every rule but zoh).
    """
    arch_zoo = {
        'tiny': dict(embed_dims=192, depth=24),
        'small': dict(embed_dims=384, depth=24),
        'base': dict(embed_dims=768, depth=24),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 img_size: int = 224,
                 patch_size: int = 16,
                 in_channels: int = 3,
                 ssm_cfg: Optional[dict] = None,
                 discretization='zoh',
                 drop_path_rate: float = 0.0,
                 residual_in_fp32: bool = True,
                 norm_eps: float = 1e-5,
                 reinit_dt_after_load: Optional[bool] = None,
                 with_cp: bool = False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if isinstance(arch, str):
            if arch not in self.arch_zoo:
                raise ValueError(f'unknown Vim arch {arch!r}; valid: {sorted(self.arch_zoo)} or a dict')
            arch = self.arch_zoo[arch]
        if not {'embed_dims', 'depth'} <= set(arch):
            raise ValueError(f'a custom arch needs embed_dims and depth, got {arch}')
        self.embed_dims = int(arch['embed_dims'])
        self.depth = int(arch['depth'])
        self.patch_size = patch_size
        self.with_cp = with_cp
        self.discretizer = build_discretizer(discretization)
        self.ssm_cfg = {**DEFAULT_SSM_CFG, **(ssm_cfg or {})}
        self.reinit_dt_after_load = (self.discretizer.name != 'zoh' if reinit_dt_after_load is None
                                     else reinit_dt_after_load)

        self.patch_embed = PatchEmbed(in_channels, self.embed_dims, patch_size)
        self.pos_grid = (img_size // patch_size, img_size // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], self.embed_dims))
        dpr = torch.linspace(0, drop_path_rate, self.depth).tolist()
        self.layers = nn.ModuleList(
            VimBlock(self.embed_dims, self.ssm_cfg, self.discretizer, dpr[i], residual_in_fp32, norm_eps, i)
            for i in range(self.depth))
        self.out_drop_path = DropPath(dpr[-1]) if drop_path_rate > 0 else nn.Identity()
        self._init_from_scratch()

    def _init_from_scratch(self):
        # Vim: trunc-normal linear weights, zero biases (dt_proj keeps mamba's init), out_proj rescaled by depth
        trunc_normal_(self.pos_embed, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith(('dt_proj', 'dt_proj_b')):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for layer in self.layers:
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w /= math.sqrt(self.depth)

    def init_weights(self):
        if self.init_cfg is not None and self.init_cfg.get('type') == 'Pretrained':
            self._load_official(self.init_cfg['checkpoint'])
            if self.reinit_dt_after_load:
                for layer in self.layers:
                    layer.mixer.reset_dt_proj(bias_only=True)
                print_log(f'VimBackbone: re-initialised dt_proj(_b).bias of {self.depth} layers from ssm_cfg '
                          f'(dt_min={self.ssm_cfg["dt_min"]}, dt_max={self.ssm_cfg["dt_max"]}) after loading, '
                          f'for rule {self.discretizer.name!r}', logger='current')
            return
        super().init_weights()

    def _load_official(self, filename: str) -> None:
        from .checkpoint_convert import convert_vim_state_dict, load_converted_state_dict, load_vim_checkpoint
        state = convert_vim_state_dict(load_vim_checkpoint(filename), self.pos_grid, self.depth, self.embed_dims)
        load_converted_state_dict(self, state)
        print_log(f'VimBackbone: loaded {filename}', logger='current')

    @property
    def mixers(self):
        return [layer.mixer for layer in self.layers]

    def interpolated_pos_embed(self, hw: Sequence[int]) -> torch.Tensor:
        if tuple(hw) == self.pos_grid:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=tuple(hw), mode='bicubic', align_corners=False)
        return grid.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)

    def forward(self, x):
        tokens, hw = self.patch_embed(x)
        hidden = tokens + self.interpolated_pos_embed(hw)
        residual = None
        for layer in self.layers:
            if self.with_cp and hidden.requires_grad:
                hidden, residual = cp.checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
        out = residual + self.out_drop_path(hidden)
        B, _, C = out.shape
        return (out.transpose(1, 2).reshape(B, C, *hw).to(x.dtype), )

"""Vision Mamba (Vim) backbone for dense prediction, with a pluggable SSM discretization rule.

Parameter names follow the official Vim release ("bimamba v2") so its ImageNet checkpoints load:
``patch_embed.proj``, ``pos_embed``, ``layers.{i}.norm``, ``layers.{i}.mixer.{in_proj, conv1d(_b), x_proj(_b),
dt_proj(_b), A_log / A_b_log, D / D_b, out_proj}``. The fused operators (residual add + RMSNorm, the depthwise
conv + SiLU, the selective scan) live in ``kernels/``.

Layout: the residual stream is channels-first, (batch, C, L), from the patch embedding's (batch, C, H, W) to the
output map, so every projection is one matmul of a weight with a (batch, features, L) tensor and no token-major
copy or transpose is ever made. The two scan directions are stacked on a new axis (batch, 2, ...) and go through
each op once: one conv launch, one batched GEMM per projection, one scan launch, and out_proj over both
directions at once (its K = 2 * d_inner sums them).
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_

from kernels import add_rms_norm, bidirectional_selective_scan, depthwise_conv1d_silu
from mmdet.registry import MODELS
from .cuda_graph import graphed_forward
from .discretizers import build_discretizer

DEFAULT_SSM_CFG = dict(d_state=16, d_conv=4, expand=2, dt_rank='auto', dt_min=0.001, dt_max=0.1,
                       dt_init_floor=1e-4, dt_scale=1.0, dt_init='random')


class RMSNorm(nn.Module):
    """RMSNorm over the channels of a channels-first (batch, C, L) tensor, as mamba-ssm's (in fp32)."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(1, keepdim=True) + self.eps)
        return (out * self.weight.float()[:, None]).to(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; ``proj`` matches the official key ``patch_embed.proj``."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)

    def forward(self, x):
        """(batch, 3, H, W) -> tokens channels-first (batch, C, L), and the grid (H / p, W / p)."""
        x = self.proj(x)
        return x.flatten(2), x.shape[-2:]


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
    per token, and the scan runs in reverse; the result equals Vim's flip -> scan -> flip. Both directions are
    stacked on axis 1 and computed together (module docstring); the per-direction parameters are stacked per
    call (tiny copies) so the official parameter names stay.
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

    def _stacked(self, name):
        """The two directions' copies of a parameter, stacked: (2, ...)."""
        return torch.stack([getattr(self, name), getattr(self, name + '_b')])

    def forward(self, hidden):
        """hidden: (batch, d_model, L) channels-first -> (batch, d_model, L)."""
        Di, N, R = self.d_inner, self.d_state, self.dt_rank
        batch, _, L = hidden.shape
        xz = torch.matmul(self.in_proj.weight, hidden)  # (batch, 2 * d_inner, L)
        x, z = xz[:, :Di], xz[:, Di:]
        conv_w = torch.stack([self.conv1d.weight[:, 0], self.conv1d_b.weight[:, 0]])  # (2, d_inner, d_conv)
        u = depthwise_conv1d_silu(x, conv_w, torch.stack([self.conv1d.bias, self.conv1d_b.bias]))  # (b, 2, Di, L)
        x_dbl = torch.matmul(torch.stack([self.x_proj.weight, self.x_proj_b.weight]), u)  # (b, 2, R + 2N, L)
        # dt_proj's bias goes to the scan as delta_bias (softplus(delta + bias) is computed there)
        delta = torch.matmul(torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]), x_dbl[:, :, :R])
        A = -torch.exp(torch.stack([self.A_log, self.A_b_log]).float())  # (2, d_inner, N)
        bias = torch.stack([self.dt_proj.bias, self.dt_proj_b.bias]).float()
        if self.record_stats:  # delta in original order for both directions; the statistics ignore order
            with torch.no_grad():
                self.ssm_stats = {
                    direction: dict(delta=F.softplus(delta[:, r].float() + bias[r][:, None]), A=A[r].detach())
                    for r, direction in enumerate(('fwd', 'bwd'))}
        y = bidirectional_selective_scan(u, delta, A, x_dbl[:, :, R:R + N], x_dbl[:, :, R + N:],
                                         self._stacked('D').float(), z=z, delta_bias=bias, delta_softplus=True,
                                         discretization=self.discretizer)  # (batch, 2, d_inner, L)
        # (out + out_b) / 2 then out_proj, as one GEMM over both directions: K = 2 * d_inner
        w = self.out_proj.weight * 0.5
        return torch.matmul(torch.cat([w, w], 1), y.view(batch, 2 * Di, L))


class VimBlock(nn.Module):
    """Pre-norm residual block in Vim's form: the residual stream (batch, C, L) is carried separately in fp32.

    residual <- residual + drop_path(hidden); hidden <- mixer(RMSNorm(residual)): the add, DropPath's per-sample
    factor (drawn by the backbone, see VimBackbone.drop_path_scales) and the norm are one fused kernel
    (kernels.add_rms_norm); its output is already in the autocast dtype the mixer's first GEMM would cast it to.
    """

    def __init__(self, dims, ssm_cfg, discretizer, drop_path, residual_in_fp32, norm_eps, layer_idx):
        super().__init__()
        if not residual_in_fp32:
            raise ValueError('VimBlock keeps the residual stream in fp32 (residual_in_fp32=True); the fused '
                             'add + RMSNorm has no half-precision residual')
        self.norm = RMSNorm(dims, eps=norm_eps)
        self.mixer = BiMambaMixer(dims, ssm_cfg, discretizer, layer_idx)
        self.drop_prob = float(drop_path)

    def forward(self, hidden, residual, drop_scale=None):
        """hidden, residual: (batch, C, L); residual None in the first block; drop_scale: (batch,) DropPath
        factors for hidden, or None. Returns the pair for the next block."""
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else self.norm.weight.dtype
        normed, residual = add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps,
                                        scale=None if residual is None else drop_scale, out_dtype=dtype)
        return self.mixer(normed), residual


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
        with_cp (bool): activation checkpointing per layer (never captured in a CUDA graph).
        cuda_graph (bool): in training on CUDA, replay CUDA graphs of the forward and backward
            (``models/cuda_graph.py``) once an input shape has been seen ``cuda_graph_warmup`` times; eval, CPU,
            ``with_cp``, SSM-statistics iterations and extra shapes run eagerly. False (the default until the
            detector step with capture has run on a GPU, docs/performance.md): always eager.
        cuda_graph_warmup (int): eager calls of a new input signature before it is captured.
        cuda_graph_max (int): input signatures captured at most (each keeps its own activation memory).
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
                 cuda_graph: bool = False,
                 cuda_graph_warmup: int = 2,
                 cuda_graph_max: int = 1,
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
        if cuda_graph_warmup < 0 or cuda_graph_max < 0:
            raise ValueError(f'cuda_graph_warmup and cuda_graph_max must be >= 0, got {cuda_graph_warmup}, '
                             f'{cuda_graph_max}')
        self.cuda_graph = bool(cuda_graph)  # plain attributes: the graphs themselves live outside the module
        self.cuda_graph_warmup = int(cuda_graph_warmup)
        self.cuda_graph_max = int(cuda_graph_max)
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
        # DropPath keep probabilities: block i's add (block 0 adds nothing), then the final add (not state)
        self.drop_path_rate = float(drop_path_rate)
        self.register_buffer('drop_keep', 1.0 - torch.tensor(dpr + dpr[-1:]), persistent=False)
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
        """x: (B, C_in, H, W) -> ((B, embed_dims, H / patch, W / patch), ).

        With ``cuda_graph`` on, a training call on CUDA may replay captured CUDA graphs of
        :meth:`forward_eager` (see ``models/cuda_graph.py``); a replayed output is a static buffer that the next
        training call overwrites, so consume it (and run its backward) within the step.
        """
        scales = self.drop_path_scales(x)
        extra = () if scales is None else (scales, )
        if self.cuda_graph:
            return graphed_forward(self, x, *extra)
        return self.forward_eager(x, *extra)

    def drop_path_scales(self, x):
        """DropPath's per-sample factors of one training step, (depth + 1, batch): row i scales what block i
        adds to the residual stream, the last row the final add; 0 with the drop probability, else 1 / keep.
        Drawn here in ONE call, outside any CUDA graph, and handed to forward_eager as an input: a replayed
        step uses this step's masks, and captured and eager runs draw the same random numbers. None when
        DropPath is off (eval, or drop_path_rate 0)."""
        if not self.training or self.drop_path_rate == 0:
            return None
        keep = self.drop_keep[:, None]
        return (torch.rand(len(self.drop_keep), x.shape[0], device=x.device) < keep) / keep

    def forward_eager(self, x, drop_scales=None):
        """The backbone as plain PyTorch ops (what a CUDA graph of it captures); drop_scales: drop_path_scales."""
        tokens, hw = self.patch_embed(x)
        hidden = tokens + self.interpolated_pos_embed(hw).transpose(1, 2)
        residual = None
        for i, layer in enumerate(self.layers):
            scale = None if drop_scales is None else drop_scales[i]
            if self.with_cp and hidden.requires_grad:
                hidden, residual = cp.checkpoint(layer, hidden, residual, scale, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, scale)
        out = residual + (hidden if drop_scales is None else hidden * drop_scales[-1][:, None, None])
        return (out.reshape(*out.shape[:2], *hw).to(x.dtype), )

import math

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import init_default_scope

from projects.vim_disc.models import SimpleFPN, VimBackbone, build_discretizer
from projects.vim_disc.models.vim import BiMambaMixer

TINY = dict(embed_dims=32, depth=2)

# every parameter of one official Vim layer (bimamba v2), as named in vim_t_midclstok_76p1acc.pth
OFFICIAL_LAYER_KEYS = {
    'norm.weight', 'mixer.A_log', 'mixer.A_b_log', 'mixer.D', 'mixer.D_b', 'mixer.in_proj.weight',
    'mixer.conv1d.weight', 'mixer.conv1d.bias', 'mixer.conv1d_b.weight', 'mixer.conv1d_b.bias',
    'mixer.x_proj.weight', 'mixer.x_proj_b.weight', 'mixer.dt_proj.weight', 'mixer.dt_proj.bias',
    'mixer.dt_proj_b.weight', 'mixer.dt_proj_b.bias', 'mixer.out_proj.weight'
}


@pytest.mark.parametrize('hw', [(64, 64), (48, 80), (96, 32)])
def test_output_is_one_stride16_map(hw):
    model = VimBackbone(arch=TINY, img_size=64)
    out = model(torch.randn(2, 3, *hw))
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (2, 32, hw[0] // 16, hw[1] // 16)
    assert torch.isfinite(out[0]).all()


def test_tiny_preset_matches_the_official_layout():
    model = VimBackbone(arch='tiny', img_size=224)
    state = model.state_dict()
    assert state['patch_embed.proj.weight'].shape == (192, 3, 16, 16)
    assert state['pos_embed'].shape == (1, 196, 192)
    assert len(model.layers) == 24
    for i in (0, 23):
        keys = {k[len(f'layers.{i}.'):] for k in state if k.startswith(f'layers.{i}.')}
        assert keys == OFFICIAL_LAYER_KEYS
    # shapes of the tiny release: d_inner 384, d_state 16, dt_rank 12, d_conv 4
    assert state['layers.0.mixer.in_proj.weight'].shape == (768, 192)
    assert state['layers.0.mixer.x_proj_b.weight'].shape == (12 + 32, 384)
    assert state['layers.0.mixer.dt_proj.weight'].shape == (384, 12)
    assert state['layers.0.mixer.A_b_log'].shape == (384, 16)
    assert state['layers.0.mixer.conv1d_b.weight'].shape == (384, 1, 4)
    assert state['layers.0.mixer.out_proj.weight'].shape == (192, 384)
    assert not any(k.startswith(('head', 'norm_f', 'cls_token', 'rope')) for k in state)


def official_layer_shapes(dims: int, d_state: int = 16, d_conv: int = 4) -> dict:
    """Each parameter of one official Vim layer (bimamba v2, expand 2, dt_rank ceil(dims / 16)) and its shape."""
    inner, rank = 2 * dims, math.ceil(dims / 16)
    shapes = {'norm.weight': (dims, ), 'mixer.in_proj.weight': (2 * inner, dims),
              'mixer.out_proj.weight': (dims, inner)}
    for suffix in ('', '_b'):
        shapes.update({
            f'mixer.A{suffix}_log': (inner, d_state), f'mixer.D{suffix}': (inner, ),
            f'mixer.conv1d{suffix}.weight': (inner, 1, d_conv), f'mixer.conv1d{suffix}.bias': (inner, ),
            f'mixer.x_proj{suffix}.weight': (rank + 2 * d_state, inner),
            f'mixer.dt_proj{suffix}.weight': (inner, rank), f'mixer.dt_proj{suffix}.bias': (inner, )})
    return shapes


# the Vim paper's Table 1 (ImageNet classifiers: + middle cls token, final norm, 1000-class head): 7M, 26M, 98M
@pytest.mark.parametrize('arch,dims,paper_millions', [('tiny', 192, 7), ('small', 384, 26), ('base', 768, 98)])
def test_presets(arch, dims, paper_millions):
    model = VimBackbone(arch=arch, img_size=224)
    assert model.embed_dims == dims and len(model.layers) == model.depth == 24
    layer = official_layer_shapes(dims)
    assert set(layer) == OFFICIAL_LAYER_KEYS
    expected = {'patch_embed.proj.weight': (dims, 3, 16, 16), 'patch_embed.proj.bias': (dims, ),
                'pos_embed': (1, 14 * 14, dims)}
    expected.update({f'layers.{i}.{k}': shape for i in range(24) for k, shape in layer.items()})
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(math.prod(shape) for shape in expected.values())
    classifier_extras = 3 * dims + dims * 1000 + 1000  # cls token, its pos_embed row, norm_f; head
    assert round((count + classifier_extras) / 1e6) == paper_millions


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = VimBackbone(arch=TINY, img_size=64, drop_path_rate=0.1)
    model(torch.randn(2, 3, 64, 48))[0].square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f'no gradient for {missing}'


def test_both_directions_are_used():
    """Flipping the sequence must change the output: a forward-only scan would make the block causal."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, dict(d_state=4), build_discretizer('zoh'))
    x = torch.randn(1, 16, 9)  # channels-first (batch, d_model, L)
    y = mixer(x)
    # the first token sees later tokens only through the backward direction
    x2 = x.clone()
    x2[..., -1] += 1.0
    assert not torch.allclose(mixer(x2)[..., 0], y[..., 0])
    with torch.no_grad():
        mixer.x_proj_b.weight.zero_()
        mixer.D_b.zero_()
    y_a, y_b = mixer(x), mixer(x2)
    # with the backward direction's input path silenced only its D*u term remains (zeroed): causal again
    assert torch.allclose(y_a[..., 0], y_b[..., 0], atol=1e-6)


def test_dt_proj_init_follows_mamba():
    torch.manual_seed(0)
    cfg = dict(dt_min=0.0005, dt_max=0.03, dt_scale=0.3, dt_init_floor=1e-4)
    mixer = BiMambaMixer(192, cfg, build_discretizer('zoh'))
    for dt_proj in (mixer.dt_proj, mixer.dt_proj_b):
        dt = F.softplus(dt_proj.bias.detach().double())
        assert dt.min() >= 0.0005 * 0.999 and dt.max() <= 0.03 * 1.001
        # log-uniform: log(dt) is uniform on [log dt_min, log dt_max]
        log_dt = dt.log()
        lo, hi = math.log(0.0005), math.log(0.03)
        assert abs(log_dt.mean().item() - (lo + hi) / 2) < 0.15 * (hi - lo)
        assert abs(log_dt.std().item() - (hi - lo) / math.sqrt(12)) < 0.15 * (hi - lo) / math.sqrt(12)
        std = mixer.dt_rank ** -0.5 * 0.3
        w = dt_proj.weight.detach()
        assert w.abs().max() <= std and w.abs().max() > 0.9 * std  # uniform(-std, std)
    assert mixer.dt_rank == 12


def test_dt_floor_applies():
    torch.manual_seed(0)
    mixer = BiMambaMixer(32, dict(dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3), build_discretizer('zoh'))
    dt = F.softplus(mixer.dt_proj.bias.detach().double())
    assert torch.allclose(dt, torch.full_like(dt, 1e-3), rtol=1e-5)


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        VimBackbone(arch=TINY, discretization='tustin')
    for name in ('zoh', 'foh', 'bilinear', 'poly', 'highorder', 'rk4'):
        assert name in str(err.value)


def test_unknown_ssm_cfg_key_is_refused():
    with pytest.raises(ValueError, match='dt_mn'):
        VimBackbone(arch=TINY, ssm_cfg=dict(dt_mn=0.1))


def test_every_mixer_shares_the_configured_rule():
    model = VimBackbone(arch=TINY, discretization='bilinear')
    assert {m.discretizer.name for m in model.mixers} == {'bilinear'}


def test_record_stats_collects_both_directions():
    model = VimBackbone(arch=TINY, img_size=64)
    for m in model.mixers:
        m.record_stats = True
    model(torch.randn(1, 3, 64, 64))
    for m in model.mixers:
        assert set(m.ssm_stats) == {'fwd', 'bwd'}
        assert m.ssm_stats['fwd']['delta'].shape == (1, m.d_inner, 16)
        assert (m.ssm_stats['bwd']['delta'] > 0).all()


def test_pos_embed_interpolates_to_the_input_grid():
    model = VimBackbone(arch=TINY, img_size=64)
    assert model.interpolated_pos_embed((4, 4)) is model.pos_embed
    assert model.interpolated_pos_embed((3, 5)).shape == (1, 15, 32)


def test_simple_fpn_levels():
    init_default_scope('mmdet')  # LN2d is registered in mmdet's scope, as in a runner
    neck = SimpleFPN(32, [8, 16, 32, 32], 24, num_outs=5, norm_cfg=dict(type='LN2d', requires_grad=True))
    outs = neck((torch.randn(2, 32, 4, 6), ))
    assert [o.shape[-2:] for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(o.shape[1] == 24 for o in outs)


def test_simple_fpn_rejects_inconsistent_widths():
    with pytest.raises(ValueError, match='keeps 32 channels'):
        SimpleFPN(32, [8, 16, 16, 32], 24, num_outs=5)


def test_fp32_roi_extractor_under_bf16_autocast():
    from projects.vim_disc.models import FP32SingleRoIExtractor
    init_default_scope('mmdet')
    ext = FP32SingleRoIExtractor(roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                                 out_channels=8, featmap_strides=[4, 8])
    feats = (torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8))
    rois = torch.tensor([[0., 4., 4., 40., 40.], [0., 0., 0., 60., 50.]])
    ref = ext(feats, rois)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ext(tuple(f.bfloat16() for f in feats), rois)
    assert out.dtype == torch.float32 and out.shape == (2, 8, 7, 7)
    # only the bf16 rounding of the input features separates the two
    assert torch.allclose(out, ref, atol=0.05)


def test_a_user_registered_rule_builds_from_config():
    from projects.vim_disc.models import DISCRETIZERS
    from tests.kernels.user_rules import ForwardEuler
    DISCRETIZERS.register_module(name='EulerForTest', module=ForwardEuler, force=True)
    try:
        model = VimBackbone(arch=TINY, img_size=64, discretization=dict(type='EulerForTest', clamp=True))
        assert all(isinstance(m.discretizer, ForwardEuler) for m in model.mixers)
        assert model.mixers[0].discretizer.z_clamp == -2.0
        assert model.reinit_dt_after_load  # not zoh: dt biases follow ssm_cfg after loading weights
        out = model(torch.randn(1, 3, 64, 64))[0]
        assert torch.isfinite(out).all()
    finally:
        DISCRETIZERS.module_dict.pop('EulerForTest')


def test_anticausal_conv_is_the_causal_conv_of_the_flipped_sequence():
    """The backward direction's conv, read on the original sequence: the reversed kernel looking ahead."""
    torch.manual_seed(0)
    C, K, L = 6, 4, 11
    conv = torch.nn.Conv1d(C, C, K, groups=C, padding=K - 1).double()
    x = torch.randn(2, C, L, dtype=torch.float64)
    flipped = conv(x.flip(-1))[..., :L].flip(-1)
    anticausal = F.conv1d(x, conv.weight.flip(-1), conv.bias, padding=K - 1, groups=C)[..., K - 1:K - 1 + L]
    torch.testing.assert_close(anticausal, flipped)
    # y[t] = sum_k w[K-1-k] x[t+k] + b, zero past the end
    xp = F.pad(x, (0, K - 1))
    w = conv.weight[:, 0]
    explicit = sum(w[None, :, K - 1 - k, None] * xp[..., k:k + L] for k in range(K)) + conv.bias[None, :, None]
    torch.testing.assert_close(anticausal, explicit)


def flip_reference_mixer(mixer, hidden):
    """BiMambaMixer.forward as Vim computes it, token-major (batch, L, d_model) with nn.Linear projections: the
    backward direction flips the sequence, runs the causal conv1d_b and a forward scan on the flipped tensors,
    and flips the result back. Returns (out, bwd delta)."""
    from kernels import selective_scan_fn

    def direction(xz, conv, x_proj, dt_proj, A_log, D):
        L = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :L])
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        y = selective_scan_fn(x, delta.contiguous(), -torch.exp(A_log.float()), B.transpose(1, 2).contiguous(),
                              C.transpose(1, 2).contiguous(), D.float(), z=z, delta_bias=dt_proj.bias.float(),
                              delta_softplus=True, discretization=mixer.discretizer, reverse=False)
        return y, F.softplus(delta.float() + dt_proj.bias.float()[:, None])

    xz = mixer.in_proj(hidden).transpose(1, 2)
    out, _ = direction(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    out_b, delta_b = direction(xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log,
                               mixer.D_b)
    return mixer.out_proj(((out + out_b.flip(-1)) / 2).transpose(1, 2)), delta_b.flip(-1)


@pytest.mark.parametrize('rule', ['zoh', 'foh', 'highorder'])
def test_reverse_scan_backward_direction_matches_the_flipped_one(rule, monkeypatch):
    """The flip-free backward direction (anti-causal conv + reverse scan) equals Vim's flip -> scan -> flip,
    outputs and every gradient; foh / highorder carry input history, where the scan direction matters."""
    from projects.vim_disc.models import vim as vim_module
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, dict(d_state=4), build_discretizer(rule)).double()
    with torch.no_grad():  # a non-trivial conv kernel and bias, so a mis-ordered conv cannot pass
        for conv in (mixer.conv1d, mixer.conv1d_b):
            conv.weight.normal_()
            conv.bias.normal_()
    hidden = torch.randn(2, 13, 16, dtype=torch.float64)
    params = dict(mixer.named_parameters())

    def output_and_grads(fn):
        x = hidden.clone().requires_grad_()
        out = fn(x)  # token-major
        grads = torch.autograd.grad(out.square().sum(), [x, *params.values()])
        return out.detach(), dict(zip(['hidden', *params], grads))

    def channels_first(x):
        return mixer(x.transpose(1, 2)).transpose(1, 2)

    mixer.record_stats = True
    out, grads = output_and_grads(channels_first)
    stats = mixer.ssm_stats
    mixer.record_stats, mixer.ssm_stats = False, None
    ref, ref_grads = output_and_grads(lambda x: flip_reference_mixer(mixer, x)[0])
    torch.testing.assert_close(out, ref)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m, n=name: f'grad of {n}: {m}')
    # the statistics of the backward direction: its delta, in original order
    with torch.no_grad():
        ref_delta_b = flip_reference_mixer(mixer, hidden)[1]
    assert set(stats) == {'fwd', 'bwd'}
    torch.testing.assert_close(stats['bwd']['delta'], ref_delta_b)

    # the test can fail: the same flip-free backward branch scanned forward is a different function
    from kernels import selective_scan_fn

    def both_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, discretization):
        return torch.stack([selective_scan_fn(u[:, r], delta[:, r], A[r], B[:, r], C[:, r], D[r], z, delta_bias[r],
                                              delta_softplus, discretization=discretization) for r in (0, 1)], 1)

    monkeypatch.setattr(vim_module, 'bidirectional_selective_scan', both_forward)
    with torch.no_grad():
        wrong = channels_first(hidden)
    assert not torch.allclose(wrong, ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('rule', ['zoh', 'foh'])
def test_fused_kernels_match_the_torch_path(rule, monkeypatch):
    """The backbone through the fused Triton kernels (add + RMSNorm, both convs in one launch, both scans in one
    launch; Triton's interpreter here) equals its torch path, output and every parameter gradient."""
    torch.manual_seed(0)
    model = VimBackbone(arch=dict(embed_dims=16, depth=2), img_size=32, ssm_cfg=dict(d_state=3),
                        discretization=rule, drop_path_rate=0.0)
    x = torch.randn(2, 3, 48, 80)  # 3 x 5 tokens

    def run(mode):
        for var in ('VIM_DISC_SCAN', 'VIM_DISC_CONV', 'VIM_DISC_NORM'):
            monkeypatch.setenv(var, mode if mode == 'triton' or var != 'VIM_DISC_SCAN' else 'parallel')
        model.zero_grad()
        out = model(x)[0]
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused, fused_grads = run('triton')
    ref, ref_grads = run('ref')
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f'{n}: {m}')

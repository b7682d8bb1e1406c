"""Official Vim checkpoint conversion, against synthetic checkpoints with the exact layout of the tiny release."""
import argparse
import logging
import os
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

from projects.vim_disc.models.checkpoint_convert import (convert_vim_state_dict, load_converted_state_dict,
                                                         load_vim_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Vim-T: width 192, 24 layers, d_inner 384, d_state 16, dt_rank ceil(192 / 16) = 12, d_conv 4, 14 x 14 patches
TINY = dict(embed_dims=192, depth=24, d_inner=384, d_state=16, dt_rank=12, d_conv=4)
MIXER_KEYS = ('in_proj.weight', 'conv1d.weight', 'conv1d.bias', 'conv1d_b.weight', 'conv1d_b.bias', 'x_proj.weight',
              'x_proj_b.weight', 'dt_proj.weight', 'dt_proj.bias', 'dt_proj_b.weight', 'dt_proj_b.bias', 'A_log',
              'A_b_log', 'D', 'D_b', 'out_proj.weight')


def official_state_dict(embed_dims=192, depth=24, d_state=16, d_conv=4, grid=14, with_rope=False, seed=0):
    """A state dict shaped like ``vim_t_midclstok_76p1acc.pth['model']`` (bimamba v2, middle class token)."""
    g = torch.Generator().manual_seed(seed)
    C, E = embed_dims, 2 * embed_dims
    R = -(-embed_dims // 16)
    shapes = {
        'cls_token': (1, 1, C),
        'pos_embed': (1, grid * grid + 1, C),
        'patch_embed.proj.weight': (C, 3, 16, 16),
        'patch_embed.proj.bias': (C, ),
        'head.weight': (1000, C),
        'head.bias': (1000, ),
        'norm_f.weight': (C, ),
    }
    for i in range(depth):
        p = f'layers.{i}.'
        shapes[p + 'norm.weight'] = (C, )
        shapes[p + 'mixer.in_proj.weight'] = (2 * E, C)
        shapes[p + 'mixer.out_proj.weight'] = (C, E)
        for s in ('', '_b'):
            shapes[p + f'mixer.conv1d{s}.weight'] = (E, 1, d_conv)
            shapes[p + f'mixer.conv1d{s}.bias'] = (E, )
            shapes[p + f'mixer.x_proj{s}.weight'] = (R + 2 * d_state, E)
            shapes[p + f'mixer.dt_proj{s}.weight'] = (E, R)
            shapes[p + f'mixer.dt_proj{s}.bias'] = (E, )
            shapes[p + f'mixer.D{s}'] = (E, )
        shapes[p + 'mixer.A_log'] = (E, d_state)
        shapes[p + 'mixer.A_b_log'] = (E, d_state)
    if with_rope:
        shapes['rope.freqs_cos'] = (grid * grid, C // 2)
        shapes['rope.freqs_sin'] = (grid * grid, C // 2)
    # the scale of trained weights (std 0.02), so that a model built from it also runs sensibly
    return {k: 0.02 * torch.randn(shape, generator=g) for k, shape in shapes.items()}


def test_synthetic_layout_matches_the_tiny_release():
    sd = official_state_dict()
    assert sd['pos_embed'].shape == (1, 197, 192)
    assert sd['layers.0.mixer.in_proj.weight'].shape == (2 * TINY['d_inner'], 192)
    assert sd['layers.0.mixer.x_proj.weight'].shape == (TINY['dt_rank'] + 2 * TINY['d_state'], TINY['d_inner'])
    assert sd['layers.0.mixer.A_log'].shape == (TINY['d_inner'], TINY['d_state'])
    assert sd['layers.23.mixer.conv1d_b.weight'].shape == (TINY['d_inner'], 1, TINY['d_conv'])
    assert len([k for k in sd if k.startswith('layers.')]) == 24 * (1 + len(MIXER_KEYS))


def test_class_token_embedding_is_removed_at_its_middle_index():
    sd = official_state_dict()
    # position t holds the value t in every channel, so we can see which one went missing
    sd['pos_embed'] = torch.arange(197, dtype=torch.float32).view(1, 197, 1).expand(1, 197, 192).clone()
    out = convert_vim_state_dict(sd, (14, 14), 24, 192)
    kept = out['pos_embed'][0, :, 0]
    expected = torch.cat([torch.arange(0, 98), torch.arange(99, 197)]).float()
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    assert out['pos_embed'].shape == (1, 196, 192)


def test_position_grid_is_resized_bicubically_row_major():
    sd = official_state_dict()
    rows = torch.arange(14, dtype=torch.float32).view(14, 1).expand(14, 14)
    cols = torch.arange(14, dtype=torch.float32).view(1, 14).expand(14, 14)
    # channel 0 varies along rows only, channel 1 along columns only
    patch = torch.randn(14 * 14, 192)
    patch[:, 0] = rows.reshape(-1)
    patch[:, 1] = cols.reshape(-1)
    cls = torch.full((1, 192), 1e4)
    sd['pos_embed'] = torch.cat([patch[:98], cls, patch[98:]]).unsqueeze(0)

    out = convert_vim_state_dict(sd, (6, 10), 24, 192)['pos_embed']
    assert out.shape == (1, 60, 192)
    grid = out[0].reshape(6, 10, 192)
    # a row-major layout keeps row-only values constant along each row and column-only values along each column
    assert torch.allclose(grid[:, :, 0], grid[:, :1, 0].expand(6, 10))
    assert torch.allclose(grid[:, :, 1], grid[:1, :, 1].expand(6, 10))
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all() and (grid[0, 1:, 1] > grid[0, :-1, 1]).all()
    # and the class token's 1e4 did not leak into the grid
    assert out.abs().max() < 100
    reference = F.interpolate(patch.T.reshape(1, 192, 14, 14), size=(6, 10), mode='bicubic', align_corners=False)
    torch.testing.assert_close(out, reference.flatten(2).transpose(1, 2))


def test_classification_keys_are_dropped_and_the_rest_kept_unchanged(caplog):
    sd = official_state_dict(with_rope=True)
    original = {k: v.clone() for k, v in sd.items()}
    logger = logging.getLogger('test_vim_convert')
    with caplog.at_level(logging.INFO, logger='test_vim_convert'):
        out = convert_vim_state_dict(sd, (32, 32), 24, 192, logger=logger)
    dropped = {'cls_token', 'head.weight', 'head.bias', 'norm_f.weight', 'rope.freqs_cos', 'rope.freqs_sin'}
    assert set(out) == set(sd) - dropped
    for key in out:
        if key != 'pos_embed':
            assert out[key] is sd[key]
    assert out['pos_embed'].shape == (1, 1024, 192)
    # the caller's dict is not modified
    assert set(sd) == set(original)
    for key in sd:
        torch.testing.assert_close(sd[key], original[key], rtol=0, atol=0)
    text = caplog.text
    for key in dropped:
        assert key in text
    assert '(14, 14) without the class token -> (32, 32)' in text


def test_converting_twice_is_harmless():
    sd = official_state_dict()
    once = convert_vim_state_dict(sd, None, 24, 192)
    assert once['pos_embed'].shape == (1, 196, 192)
    twice = convert_vim_state_dict(once, (20, 20), 24, 192)
    direct = convert_vim_state_dict(sd, (20, 20), 24, 192)
    torch.testing.assert_close(twice['pos_embed'], direct['pos_embed'], rtol=0, atol=0)


def test_whole_checkpoint_is_unwrapped():
    sd = official_state_dict()
    out = convert_vim_state_dict({'model': sd, 'epoch': 299}, (14, 14), 24, 192)
    assert 'layers.23.mixer.A_b_log' in out and 'epoch' not in out


def test_wrong_width_names_the_mismatch():
    sd = official_state_dict(embed_dims=48)
    with pytest.raises(ValueError, match=r'checkpoint embed_dims=48 .* backbone embed_dims=192'):
        convert_vim_state_dict(sd, (14, 14), 24, 192)


def test_wrong_depth_names_the_mismatch():
    sd = official_state_dict(depth=3)
    with pytest.raises(ValueError, match=r'checkpoint has 3 layers .* backbone depth=24'):
        convert_vim_state_dict(sd, (14, 14), 24, 192)


def test_wrong_width_and_depth_are_both_reported():
    sd = official_state_dict(embed_dims=48, depth=2)
    with pytest.raises(ValueError) as err:
        convert_vim_state_dict(sd, (14, 14), 24, 192)
    assert 'embed_dims=48' in str(err.value) and 'checkpoint has 2 layers' in str(err.value)


def test_release_checkpoint_with_training_args_loads_weights_only(tmp_path):
    """Vim's main.py also saves the argparse Namespace; that must not force weights_only off."""
    sd = official_state_dict(depth=2)
    path = tmp_path / 'vim_release.pth'
    torch.save({'model': sd, 'epoch': 299, 'args': argparse.Namespace(model='vim_tiny', lr=5e-4)}, path)
    ckpt = load_vim_checkpoint(str(path))
    assert ckpt['args'].model == 'vim_tiny'
    torch.testing.assert_close(ckpt['model']['pos_embed'], sd['pos_embed'])


def test_release_checkpoint_with_training_args_loads_under_the_safe_loader(tmp_path):
    """tools/train.py installs an allow-list loader that refuses unknown globals; the Namespace is let through."""
    from projects.vim_disc.engine.checkpoint import install_safe_checkpoint_loading
    install_safe_checkpoint_loading()
    path = tmp_path / 'vim_release.pth'
    torch.save({'model': official_state_dict(depth=1), 'args': argparse.Namespace(model='vim_tiny')}, path)
    assert load_vim_checkpoint(str(path))['args'].model == 'vim_tiny'


class NotAllowed:
    pass


def test_other_pickled_objects_are_still_refused(tmp_path):
    path = tmp_path / 'odd.pth'
    torch.save({'model': {}, 'extra': NotAllowed()}, path)
    with pytest.raises(Exception, match='NotAllowed'):
        load_vim_checkpoint(str(path))


def test_converted_tiny_checkpoint_fits_the_backbone_exactly(caplog):
    from projects.vim_disc.models.vim import VimBackbone
    backbone = VimBackbone(arch='tiny', img_size=96)
    sd = official_state_dict(with_rope=True)
    converted = convert_vim_state_dict(sd, backbone.pos_grid, backbone.depth, backbone.embed_dims)
    logger = logging.getLogger('test_vim_convert_load')
    with caplog.at_level(logging.INFO, logger='test_vim_convert_load'):
        result = load_converted_state_dict(backbone, converted, logger=logger)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert 'missing keys: none; unexpected keys: none' in caplog.text
    own = backbone.state_dict()
    assert set(own) == set(converted)
    for key, value in converted.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


def run_converter_tool(monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['vim_to_mmdet.py', *map(str, args)])
    runpy.run_path(os.path.join(ROOT, 'tools', 'model_converters', 'vim_to_mmdet.py'), run_name='__main__')


def test_converter_tool_writes_a_weights_only_backbone_checkpoint(tmp_path, monkeypatch, capsys):
    sd = official_state_dict(with_rope=True)
    src, dst = tmp_path / 'vim_t_midclstok_76p1acc.pth', tmp_path / 'out' / 'vim_t_backbone.pth'
    torch.save({'model': sd, 'args': argparse.Namespace(model='vim_tiny')}, src)
    run_converter_tool(monkeypatch, src, dst, '--arch', 'tiny')
    assert '196 patch positions' in capsys.readouterr().out
    out = torch.load(dst, weights_only=True)
    assert out['meta']['embed_dims'] == 192 and out['meta']['depth'] == 24
    expected = convert_vim_state_dict(sd, None, 24, 192)
    assert set(out['state_dict']) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(out['state_dict'][key], value, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r'checkpoint embed_dims=192 .* backbone embed_dims=384'):
        run_converter_tool(monkeypatch, src, tmp_path / 'wrong.pth', '--arch', 'small')
    assert not (tmp_path / 'wrong.pth').exists()

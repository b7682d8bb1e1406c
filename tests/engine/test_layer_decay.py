"""Layer-wise lr decay: layer ids, multipliers and weight-decay exemptions on a model with Vim's parameter names."""
import logging

import pytest
import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.optim.scheduler import LinearLR

from projects.vim_disc.engine.layer_decay import VimLayerDecayOptimizerConstructor, get_layer_id_for_vim

BASE_LR = 1e-4
WEIGHT_DECAY = 0.1
RATE = 0.837


class RMSNorm(nn.Module):

    def __init__(self, dims):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))


class LN2d(nn.Module):

    def __init__(self, dims):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.bias = nn.Parameter(torch.zeros(dims))


class ToyMixer(nn.Module):
    """The bimamba-v2 mixer's parameter names at toy sizes."""

    def __init__(self, d_model=4, d_inner=6, d_state=2, dt_rank=1):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for s in ('', '_b'):
            setattr(self, 'conv1d' + s, nn.Conv1d(d_inner, d_inner, 3, groups=d_inner))
            setattr(self, 'x_proj' + s, nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False))
            setattr(self, 'dt_proj' + s, nn.Linear(dt_rank, d_inner))
            setattr(self, 'D' + s, nn.Parameter(torch.ones(d_inner)))
        self.A_log = nn.Parameter(torch.zeros(d_inner, d_state))
        self.A_b_log = nn.Parameter(torch.zeros(d_inner, d_state))


class ToyBlock(nn.Module):

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(4)
        self.mixer = ToyMixer()


class ToyBackbone(nn.Module):

    def __init__(self, depth):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 4, 2, stride=2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 9, 4))
        self.layers = nn.ModuleList(ToyBlock() for _ in range(depth))


class ToyDetector(nn.Module):

    def __init__(self, depth=3):
        super().__init__()
        self.backbone = ToyBackbone(depth)
        self.neck = nn.Sequential(nn.Conv2d(4, 5, 1), LN2d(5))
        self.roi_head = nn.Sequential(nn.Linear(5, 5), nn.GroupNorm(1, 5), nn.Linear(5, 2, bias=False))


def build(model, **paramwise_cfg):
    paramwise_cfg = dict(decay_rate=RATE, **paramwise_cfg)
    constructor = VimLayerDecayOptimizerConstructor(
        dict(type='OptimWrapper',
             optimizer=dict(type='AdamW', lr=BASE_LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)),
        paramwise_cfg)
    return constructor(model)


def group_of(optim_wrapper, model):
    """parameter name -> its param group."""
    by_id = {id(p): g for g in optim_wrapper.optimizer.param_groups for p in g['params']}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


# every parameter of ToyDetector(depth=3) without weight decay, written out by hand from the rules
NO_DECAY = {
    'backbone.patch_embed.proj.bias', 'backbone.pos_embed',
    *(f'backbone.layers.{i}.{n}' for i in range(3) for n in (
        'norm.weight', 'mixer.conv1d.bias', 'mixer.conv1d_b.bias', 'mixer.dt_proj.bias', 'mixer.dt_proj_b.bias',
        'mixer.D', 'mixer.D_b', 'mixer.A_log', 'mixer.A_b_log')),
    'neck.0.bias', 'neck.1.weight', 'neck.1.bias', 'roi_head.0.bias', 'roi_head.1.weight', 'roi_head.1.bias',
}


def test_layer_ids_follow_vim_numbering():
    assert get_layer_id_for_vim('backbone.pos_embed', 24) == 0
    assert get_layer_id_for_vim('backbone.patch_embed.proj.weight', 24) == 0
    assert get_layer_id_for_vim('backbone.layers.0.norm.weight', 24) == 1
    assert get_layer_id_for_vim('backbone.layers.23.mixer.A_b_log', 24) == 24
    assert get_layer_id_for_vim('neck.lateral_convs.0.conv.weight', 24) == 25
    assert get_layer_id_for_vim('roi_head.bbox_head.0.fc_cls.weight', 24) == 25
    # a head parameter that happens to contain "layers." is not a backbone layer
    assert get_layer_id_for_vim('roi_head.layers.3.weight', 24) == 25


def test_every_parameter_gets_its_layer_lr_and_weight_decay():
    model = ToyDetector(depth=3)
    wrapper = build(model)
    groups = group_of(wrapper, model)
    assert set(groups) == {n for n, _ in model.named_parameters()}
    for name, group in groups.items():
        if name.startswith(('backbone.patch_embed', 'backbone.pos_embed')):
            layer_id = 0
        elif name.startswith('backbone.layers.'):
            layer_id = int(name.split('.')[2]) + 1
        else:
            layer_id = 4
        assert group['lr'] == pytest.approx(BASE_LR * RATE**(4 - layer_id)), name
        assert group['weight_decay'] == (0.0 if name in NO_DECAY else WEIGHT_DECAY), name
    # the neck and heads train at the base lr, the embeddings at rate^(num_layers + 1) of it
    assert groups['neck.0.weight']['lr'] == pytest.approx(BASE_LR)
    assert groups['backbone.pos_embed']['lr'] == pytest.approx(BASE_LR * RATE**4)


def test_groups_are_split_by_layer_and_decay_and_ordered_top_down():
    model = ToyDetector(depth=3)
    param_groups = build(model).optimizer.param_groups
    # 5 layer ids (0, 1, 2, 3, top), each with decayed and exempt parameters
    assert len(param_groups) == 10
    ids = [g['layer_id'] for g in param_groups]
    assert ids == sorted(ids, reverse=True)
    # mmengine logs the first group's lr as "lr": it must be the base schedule
    assert param_groups[0]['lr'] == pytest.approx(BASE_LR)
    assert sum(len(g['params']) for g in param_groups) == len(list(model.parameters()))


def test_schedulers_scale_every_group_from_its_own_lr():
    model = ToyDetector(depth=3)
    wrapper = build(model)
    start = [g['lr'] for g in wrapper.optimizer.param_groups]
    scheduler = LinearLR(wrapper, start_factor=0.001, by_epoch=False, begin=0, end=250)
    for g, lr in zip(wrapper.optimizer.param_groups, start):
        assert g['lr'] == pytest.approx(lr * 0.001)
    for _ in range(250):
        wrapper.step()
        scheduler.step()
    for g, lr in zip(wrapper.optimizer.param_groups, start):
        assert g['lr'] == pytest.approx(lr)


def test_frozen_parameters_are_left_out():
    model = ToyDetector(depth=3)
    model.backbone.patch_embed.proj.weight.requires_grad_(False)
    groups = group_of(build(model), model)
    assert 'backbone.patch_embed.proj.weight' not in groups
    assert 'backbone.patch_embed.proj.bias' in groups


def test_mamba_no_weight_decay_marker_is_honoured():
    model = ToyDetector(depth=3)
    model.roi_head[2].weight._no_weight_decay = True
    groups = group_of(build(model), model)
    assert groups['roi_head.2.weight']['weight_decay'] == 0.0
    assert groups['roi_head.0.weight']['weight_decay'] == WEIGHT_DECAY


def test_num_layers_is_checked_against_the_model():
    model = ToyDetector(depth=3)
    assert len(build(model, num_layers=3).optimizer.param_groups) == 10
    with pytest.raises(ValueError, match='num_layers=24 but the backbone has 3 layers'):
        build(model, num_layers=24)


def test_a_model_without_vim_layers_is_refused():
    with pytest.raises(ValueError, match='no "backbone.layers.<i>." parameters'):
        build(nn.Sequential(nn.Linear(2, 2)))


def test_parameter_groups_are_logged_once(tmp_path):
    logger = MMLogger.get_instance('test_layer_decay', log_file=str(tmp_path / 'log.txt'), log_level='INFO')
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        build(ToyDetector(depth=3))
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if 'VimLayerDecayOptimizerConstructor' in r.getMessage()]
    assert len(messages) == 1
    text = messages[0]
    assert '10 parameter groups' in text and '3 backbone layers' in text
    assert 'backbone.layers.2.mixer.A_b_log (ssm A_b_log)' in text
    assert 'neck.1.weight (norm)' in text

"""The six per-rule COCO configs: the table's values, nothing else differs, and each builds and trains a step on CPU."""
import copy
import logging
import os.path as osp
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.structures import InstanceData

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import PolygonMasks
from mmdet.utils import register_all_modules
from projects.vim_disc.models.checkpoint_convert import convert_vim_state_dict
from projects.vim_disc.utils import COCO_OVERRIDES, DEMO_CONFIG, check_data_exists
from tests.models.test_checkpoint_convert import official_state_dict

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# the table: rule -> (dt_min, dt_max, dt_scale, clip max_norm)
TABLE = {
    'zoh': (0.001, 0.1, 1.0, 1.0),
    'foh': (0.0005, 0.02, 0.25, 0.5),
    'bilinear': (0.0005, 0.03, 0.3, 0.5),
    'poly': (0.0005, 0.02, 0.3, 0.5),
    'highorder': (0.0003, 0.015, 0.2, 0.5),
    'rk4': (0.0005, 0.05, 0.5, 0.5),
}
SIZE = 128
# what tests override (tools/train.py --cfg-options takes the same keys): a 2-layer Vim of the real width at
# 128 px, no checkpoint, fewer proposals, sampled RoIs and detections (the RoI heads' 256-channel convolutions
# dominate a CPU step)
SMALL = {
    'model.backbone.arch.depth': 2,
    'model.backbone.img_size': SIZE,
    'model.backbone.init_cfg': None,
    'model.data_preprocessor.batch_augments': [dict(type='BatchFixedSizePad', size=(SIZE, SIZE), pad_mask=True)],
    'model.train_cfg.rpn_proposal.nms_pre': 200,
    'model.train_cfg.rpn_proposal.max_per_img': 50,
    'model.train_cfg.rcnn.0.sampler.num': 16,
    'model.train_cfg.rcnn.1.sampler.num': 16,
    'model.train_cfg.rcnn.2.sampler.num': 16,
    'model.test_cfg.rpn.nms_pre': 200,
    'model.test_cfg.rpn.max_per_img': 50,
    'model.test_cfg.rcnn.max_per_img': 20,
}


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    register_all_modules(init_default_scope=True)
    # register what the configs name (the package __init__ may not import every module yet)
    import projects.vim_disc.datasets.transforms  # noqa: F401
    import projects.vim_disc.engine.layer_decay  # noqa: F401
    import projects.vim_disc.engine.optim_wrapper  # noqa: F401
    import projects.vim_disc.models.roi_extractor  # noqa: F401


def load(rule: str, small: bool = False) -> Config:
    cfg = Config.fromfile(osp.join(ROOT, 'configs', f'vim_{rule}.py'))
    if small:
        cfg.merge_from_dict(SMALL)
    return cfg


def cpu_optim_wrapper_cfg(cfg: Config) -> dict:
    # the AMP wrapper refuses to build without CUDA; its plain twin has the same groups, guard and clipping
    wrapper = copy.deepcopy(cfg.optim_wrapper.to_dict())
    assert wrapper['type'] == 'GuardedAmpOptimWrapper'
    wrapper.update(type='GuardedOptimWrapper')
    wrapper.pop('dtype')
    wrapper.pop('loss_scale')
    return wrapper


def lsj_like_batch(num_images=2, seed=0):
    """Packed inputs as the LSJ pipeline hands them over: uint8 images, boxes, labels, POLYGON masks."""
    rng = np.random.default_rng(seed)
    inputs, samples = [], []
    for i in range(num_images):
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)))
        boxes, polygons = [], []
        for _ in range(3):
            x1, y1 = rng.uniform(0, SIZE * 0.6, 2)
            w, h = rng.uniform(12, SIZE * 0.4, 2)
            x2, y2 = x1 + w, y1 + h
            boxes.append([x1, y1, x2, y2])
            polygons.append([np.array([x1, y1, x2, y1, x1, y2], dtype=np.float64)])  # a triangle in its box
        sample = DetDataSample(metainfo=dict(
            img_id=i, img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE),
            scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32),
            labels=torch.from_numpy(rng.integers(0, 80, 3)),
            masks=PolygonMasks(polygons, SIZE, SIZE))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('rule', TABLE)
def test_rule_config_sets_the_table_values(rule):
    cfg = load(rule)
    dt_min, dt_max, dt_scale, max_norm = TABLE[rule]
    backbone = cfg.model.backbone
    assert backbone.discretization == rule
    assert backbone.ssm_cfg == dict(d_state=16, expand=2, dt_min=dt_min, dt_max=dt_max, dt_scale=dt_scale)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=max_norm, norm_type=2)


def test_rule_configs_differ_only_in_rule_ssm_cfg_and_clipping():

    def without_rule_fields(cfg):
        d = cfg.to_dict()
        for key in ('discretization', 'ssm_cfg'):
            d['model']['backbone'].pop(key)
        d['optim_wrapper'].pop('clip_grad')
        return d

    reference = without_rule_fields(load('zoh'))
    for rule in TABLE:
        assert without_rule_fields(load(rule)) == reference, rule


def test_zoh_config_says_why_it_keeps_mambas_defaults():
    with open(osp.join(ROOT, 'configs', 'vim_zoh.py')) as f:
        text = f.read()
    assert "Mamba's default" in text and 'on purpose' in text


def test_shared_recipe():
    cfg = load('foh')
    backbone = cfg.model.backbone
    assert backbone.type == 'VimBackbone' and backbone.arch == dict(embed_dims=192, depth=24)
    assert (backbone.patch_size, backbone.drop_path_rate, backbone.ssm_cfg.d_state, backbone.ssm_cfg.expand) == (
        16, 0.1, 16, 2)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint='checkpoints/vim_t_midclstok_76p1acc.pth')
    assert cfg.model.data_preprocessor.batch_augments == [
        dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)
    ]
    assert (cfg.model.neck.type, cfg.model.neck.out_channels, cfg.model.neck.num_outs) == ('SimpleFPN', 256, 5)
    assert cfg.model.neck.norm_cfg.type == 'LN2d'
    assert cfg.model.rpn_head.num_convs == 2
    stages = cfg.model.roi_head.bbox_head
    assert [s.type for s in stages] == ['Shared4Conv1FCBBoxHead'] * 3
    assert all(s.reg_class_agnostic and s.norm_cfg.type == 'LN2d' for s in stages)
    assert [r.assigner.pos_iou_thr for r in cfg.model.train_cfg.rcnn] == [0.5, 0.6, 0.7]
    assert cfg.model.roi_head.mask_head.norm_cfg.type == 'LN2d'

    pipeline = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
    assert pipeline['LoadAnnotations']['poly2mask'] is False
    assert pipeline['RandomResize']['ratio_range'] == (0.1, 2.0)
    crop = pipeline['PolygonRandomCrop']
    assert (crop['crop_type'], crop['crop_size'], crop['recompute_bbox'], crop['allow_negative_crop']) == (
        'absolute_range', (1024, 1024), True, True)
    assert cfg.val_evaluator.metric == ['bbox', 'segm']

    assert cfg.train_dataloader.sampler.type == 'ResumableInfiniteSampler'
    assert cfg.train_cfg.type == 'ResumableIterBasedTrainLoop' and cfg.runner_type == 'ResumableRunner'
    assert [h['type'] for h in cfg.custom_hooks] == ['RNGStateHook', 'PreemptionHook', 'NonFiniteRollbackHook',
                                                     'SSMStatsHook']
    assert cfg.model.roi_head.bbox_roi_extractor.type == cfg.model.roi_head.mask_roi_extractor.type == (
        'FP32SingleRoIExtractor')
    assert cfg.train_cfg.max_iters == 184375
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR', 0.001, 250)
    assert steps.milestones == [163889, 177546]
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.dtype) == ('GuardedAmpOptimWrapper', 'float16')
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
    assert cfg.optim_wrapper.constructor == 'VimLayerDecayOptimizerConstructor'
    assert cfg.optim_wrapper.paramwise_cfg.decay_rate == 0.837
    assert cfg.auto_scale_lr.base_batch_size == 64
    ckpt = cfg.default_hooks.checkpoint
    assert (ckpt.interval, ckpt.max_keep_ckpts, ckpt.save_last) == (5000, 5, True)
    assert {b['type'] for b in cfg.vis_backends} == {'LocalVisBackend', 'TensorboardVisBackend'}


def fake_coco(root):
    """The COCO 2017 layout the recipe reads, empty: every path exists."""
    (root / 'annotations').mkdir(parents=True)
    for split in ('train2017', 'val2017'):
        (root / 'annotations' / f'instances_{split}.json').write_text('{}')
        (root / split).mkdir()
    return root


def suggested_overrides(message: str, coco_root) -> dict:
    """The --cfg-options the missing-data message suggests, pointed at ``coco_root``."""
    options = re.search(r'--cfg-options (.+?)\. To try', message).group(1).split()
    return dict(opt.replace('/path/to/coco/', f'{coco_root}/').split('=', 1) for opt in options)


@pytest.mark.parametrize('rule', TABLE)
def test_missing_coco_names_the_expected_path_and_the_demo(rule, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's data/coco/ is relative to the working directory: absent here
    cfg = load(rule)
    with pytest.raises(FileNotFoundError) as err:
        check_data_exists(cfg)
    message = str(err.value)
    assert str(tmp_path / 'data/coco/annotations/instances_train2017.json') in message
    assert DEMO_CONFIG == 'configs/demo/vim_demo.py' and DEMO_CONFIG in message
    # the suggested overrides are complete: with them, datasets and evaluators all find a COCO elsewhere
    cfg.merge_from_dict(suggested_overrides(message, fake_coco(tmp_path / 'elsewhere')))
    check_data_exists(cfg)


@pytest.mark.parametrize('splits, evaluator', [(('train_dataloader', 'val_dataloader'), 'val_evaluator'),
                                               (('test_dataloader', ), 'test_evaluator')], ids=['train.py', 'test.py'])
def test_an_evaluator_left_at_the_default_coco_is_caught(splits, evaluator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    coco = fake_coco(tmp_path / 'coco')
    cfg = load('zoh')
    # only the dataloaders moved (what the old message suggested): the evaluators still read data/coco/
    cfg.merge_from_dict({f'{split}_dataloader.dataset.data_root': f'{coco}/' for split in ('train', 'val', 'test')})
    with pytest.raises(FileNotFoundError) as err:
        check_data_exists(cfg, splits=splits)
    message = str(err.value)
    assert message.startswith(f'{evaluator}: annotation file not found')
    assert str(tmp_path / 'data/coco/annotations/instances_val2017.json') in message
    assert f'{evaluator}.ann_file=' in message and DEMO_CONFIG in message
    cfg.merge_from_dict({f'{evaluator}.ann_file': str(coco / 'annotations/instances_val2017.json')})
    check_data_exists(cfg, splits=splits)


def test_recipe_lists_the_overrides_the_message_suggests():
    with open(osp.join(ROOT, 'docs', 'recipe.md')) as f:
        recipe = f.read()
    data = recipe[recipe.index('## Data'):]
    data = ' '.join(data[:data.index('\n## ', 1)].split())
    assert f'--cfg-options {COCO_OVERRIDES}' in data


# a whole Cascade Mask R-CNN step: ~5-15 s each on 2 cores, most of it in the RoI heads' convolutions
@pytest.mark.slow
@pytest.mark.parametrize('rule', TABLE)
def test_builds_and_trains_one_step_on_cpu(rule):
    torch.manual_seed(0)
    cfg = load(rule, small=True)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert model.backbone.discretizer.name == rule
    optim_wrapper = build_optim_wrapper(model, cpu_optim_wrapper_cfg(cfg))
    assert optim_wrapper.clip_grad_kwargs == dict(max_norm=TABLE[rule][3], norm_type=2)

    model.train()
    data = model.data_preprocessor(lsj_like_batch(), True)
    assert data['inputs'].shape == (2, 3, SIZE, SIZE)
    losses = model(**data, mode='loss')
    for stage in range(3):
        assert f's{stage}.loss_cls' in losses and f's{stage}.loss_bbox' in losses and f's{stage}.loss_mask' in losses
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)

    mixer = model.backbone.layers[0].mixer
    before = mixer.A_b_log.detach().clone()
    optim_wrapper.update_params(loss)
    # both scan directions received gradients and moved
    assert not torch.equal(before, mixer.A_b_log.detach())
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_layer_decay_groups_on_the_real_detector():
    cfg = load('poly', small=True)
    model = MODELS.build(cfg.model)
    optim_wrapper = build_optim_wrapper(model, cpu_optim_wrapper_cfg(cfg))
    by_param = {id(p): g for g in optim_wrapper.optimizer.param_groups for p in g['params']}
    groups = {n: by_param[id(p)] for n, p in model.named_parameters()}  # KeyError if a parameter has no group
    lr, rate = 1e-4, 0.837
    # 2 layers: embeddings id 0, layers.i id i + 1, the rest id 3
    assert groups['backbone.pos_embed']['lr'] == pytest.approx(lr * rate**3)
    assert groups['backbone.patch_embed.proj.weight']['lr'] == pytest.approx(lr * rate**3)
    assert groups['backbone.layers.0.mixer.in_proj.weight']['lr'] == pytest.approx(lr * rate**2)
    assert groups['backbone.layers.1.mixer.dt_proj_b.weight']['lr'] == pytest.approx(lr * rate)
    assert groups['neck.lateral_convs.0.conv.weight']['lr'] == pytest.approx(lr)
    assert groups['roi_head.bbox_head.2.fc_reg.weight']['lr'] == pytest.approx(lr)
    for name in ('backbone.pos_embed', 'backbone.layers.1.norm.weight', 'backbone.layers.0.mixer.A_log',
                 'backbone.layers.0.mixer.D_b', 'backbone.layers.0.mixer.dt_proj.bias', 'neck.branches.0.1.weight',
                 'roi_head.bbox_head.0.fc_cls.bias'):
        assert groups[name]['weight_decay'] == 0.0, name
    for name in ('backbone.layers.0.mixer.in_proj.weight', 'backbone.layers.0.mixer.x_proj_b.weight',
                 'roi_head.mask_head.2.convs.0.conv.weight'):
        assert groups[name]['weight_decay'] == 0.1, name
    # LN2d inside ConvModules is found as a norm, whatever name ConvModule gives it
    ln2d = [n for n, m in model.named_modules() if type(m).__name__ == 'LN2d']
    assert ln2d and all(groups[f'{n}.weight']['weight_decay'] == 0.0 for n in ln2d)


@pytest.mark.slow
def test_predicts_masks_at_the_original_size():
    cfg = load('bilinear', small=True)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.eval()
    data = model.data_preprocessor(lsj_like_batch(num_images=1), False)
    with torch.no_grad():
        (result, ) = model(**data, mode='predict')
    pred = result.pred_instances
    assert pred.bboxes.shape[1] == 4 and len(pred.scores) == len(pred.labels) == len(pred.masks)
    assert pred.masks.shape[1:] == (SIZE, SIZE)


def capture_current_log():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    MMLogger.get_current_instance().addHandler(handler)
    return records, handler


@pytest.mark.parametrize('rule', ['zoh', 'foh'])
def test_pretrained_release_loads_and_the_rule_ssm_cfg_takes_effect(rule, tmp_path):
    cfg = load(rule, small=True)
    ckpt = official_state_dict(depth=2, with_rope=True, seed=1)
    path = tmp_path / 'vim_t_midclstok_76p1acc.pth'
    torch.save({'model': ckpt, 'epoch': 299}, path)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(path))
    backbone = MODELS.build(cfg.model.backbone)
    records, handler = capture_current_log()
    try:
        backbone.init_weights()
    finally:
        MMLogger.get_current_instance().removeHandler(handler)
    log = '\n'.join(r.getMessage() for r in records)

    state = backbone.state_dict()
    expected_pos = convert_vim_state_dict(ckpt, (SIZE // 16, SIZE // 16), 2, 192, logger=logging.getLogger('quiet'))
    torch.testing.assert_close(state['pos_embed'], expected_pos['pos_embed'], rtol=0, atol=0)
    torch.testing.assert_close(state['layers.1.mixer.in_proj.weight'], ckpt['layers.1.mixer.in_proj.weight'])
    assert 'missing keys' in log and 'unexpected keys' in log

    dt_min, dt_max = TABLE[rule][:2]
    for i in range(2):
        for direction in ('dt_proj', 'dt_proj_b'):
            bias = state[f'layers.{i}.mixer.{direction}.bias']
            if rule == 'zoh':
                # zoh keeps the ImageNet dt biases: they were trained for it
                torch.testing.assert_close(bias, ckpt[f'layers.{i}.mixer.{direction}.bias'], rtol=0, atol=0)
            else:
                dt = F.softplus(bias)
                assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4), (i, direction)
    assert ('re-initialised' in log) == (rule != 'zoh')

"""The COCO recipe end to end through tools/train.py, on a tiny COCO-format dataset written by the test.

configs/vim_foh.py runs as configured (LSJ pipeline with the polygon crop, resumable sampler, loop and runner,
guarded optimizer wrapper with layer-wise lr decay, the custom hooks, CocoMetric bbox + segm) except for sizes and
what a CPU needs: 128 px instead of 1024, a 2-layer Vim, 50 proposals, 2 iterations, the plain (non-AMP) guarded
wrapper, and score_thr 0 so that an untrained model has detections to evaluate. The backbone starts from a
synthetic checkpoint in the official release's layout.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.models.test_checkpoint_convert import official_state_dict

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def write_tiny_coco(root: str, split: str, num_images: int, seed: int, hw=(120, 160)) -> None:
    """Noise images with 3 triangles each, in COCO's json layout with all 80 categories (ids 1-80)."""
    import mmcv
    from mmdet.datasets import CocoDataset
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, f'{split}2017'), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = hw
        name = f'{i:012d}.jpg'
        mmcv.imwrite(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), osp.join(root, f'{split}2017', name))
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        for _ in range(3):
            x, y = rng.uniform(0, 90), rng.uniform(0, 60)
            bw, bh = rng.uniform(20, 60), rng.uniform(20, 50)
            triangle = [x, y, x + bw, y, x, y + bh]
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1, category_id=int(rng.integers(1, 81)),
                bbox=[x, y, bw, bh], area=bw * bh / 2, segmentation=[triangle], iscrowd=0))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(CocoDataset.METAINFO['classes'])]
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    with open(osp.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


TEST_CONFIG = """
_base_ = '{root}/configs/vim_foh.py'
# every module the recipe names, also where the package __init__ files do not import them (yet)
custom_imports = dict(imports=[
    'projects.vim_disc', 'projects.vim_disc.datasets.transforms', 'projects.vim_disc.engine.hooks',
    'projects.vim_disc.engine.layer_decay', 'projects.vim_disc.engine.optim_wrapper',
    'projects.vim_disc.engine.sampler', 'projects.vim_disc.models.roi_extractor'], allow_failed_imports=False)
data_root = '{data_root}/'
size = (128, 128)
model = dict(
    data_preprocessor=dict(batch_augments=[dict(type='BatchFixedSizePad', size=size, pad_mask=True)]),
    backbone=dict(arch=dict(depth=2), img_size=128, init_cfg=dict(checkpoint='{checkpoint}')),
    # 50 proposals per image also cap the RoIs each cascade stage samples
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=50)),
    # score_thr 0: an untrained 81-way classifier scores below the usual 0.05, and COCO needs some detections
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=50), rcnn=dict(max_per_img=20, score_thr=0.0)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomResize', scale=size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type='PolygonRandomCrop', crop_type='absolute_range', crop_size=size, recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='Pad', size=size, pad_val=dict(img=(114, 114, 114))),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=size, keep_ratio=True),
    dict(type='Pad', size=size, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=False),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
train_cfg = dict(max_iters=2, val_interval=2, dynamic_intervals=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=2, milestones=[1], gamma=0.1),
]
# the plain guarded wrapper (AMP needs CUDA) takes no dtype / loss_scale: restate the rest of the base's
optim_wrapper = dict(
    _delete_=True, type='GuardedOptimWrapper', constructor='VimLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.837), clip_grad=dict(max_norm=0.5, norm_type=2),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
custom_hooks = [
    dict(type='RNGStateHook'),
    dict(type='PreemptionHook'),
    dict(type='NonFiniteRollbackHook', max_consecutive_skips=10, lr_factor=0.5, max_rollbacks=3),
    dict(type='SSMStatsHook', interval=1),
]
"""


@pytest.mark.slow
def test_foh_recipe_trains_and_evaluates_through_tools_train(tmp_path):
    data_root = tmp_path / 'coco'
    write_tiny_coco(str(data_root), 'train', num_images=4, seed=0)
    # square val images: the test pipeline's Pad sets img_shape to the padded size, so an untrained model's boxes
    # can all fall into the padding, outside the original image, where mmdet's CPU mask paste fails
    write_tiny_coco(str(data_root), 'val', num_images=2, seed=1, hw=(160, 160))
    checkpoint = tmp_path / 'vim_t_midclstok_76p1acc.pth'
    torch.save({'model': official_state_dict(depth=2)}, checkpoint)
    config = tmp_path / 'vim_foh_tiny.py'
    config.write_text(TEST_CONFIG.format(root=ROOT, data_root=data_root, checkpoint=checkpoint))
    work_dir = tmp_path / 'work'
    run = subprocess.run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]

    # the pretrained release was converted, and foh's ssm_cfg re-initialised the dt biases
    assert 'without the class token -> (8, 8) (bicubic)' in log
    assert "re-initialised dt_proj(_b).bias of 2 layers from ssm_cfg (dt_min=0.0005, dt_max=0.02)" in log
    # layer-wise lr decay was logged once; two iterations trained; COCO bbox and segm metrics came out
    assert log.count('VimLayerDecayOptimizerConstructor: ') == 1
    assert 'Iter(train) [2/2]' in log
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log
    assert (work_dir / 'iter_2.pth').exists()

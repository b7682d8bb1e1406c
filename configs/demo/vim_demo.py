# A small Vim Cascade Mask R-CNN on the embedded synthetic "shapes" dataset (generated into data/shapes/ on first
# use). Sized to train and evaluate on 2 CPU cores in minutes: 160 px images, a 6-layer Vim of width 128, and
# mmdet's Cascade Mask R-CNN heads with fewer proposals and sampled RoIs (RoIAlign dominates a CPU step).
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    '../_base_/default_runtime.py',
]

image_size = 160
embed_dims = 128
fpn_channels = 128
num_classes = 5
max_iters = 400


bbox_head_stage = dict(
    type='Shared2FCBBoxHead', in_channels=fpn_channels, fc_out_channels=256, roi_feat_size=7,
    num_classes=num_classes,
    bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=[0.1, 0.1, 0.2, 0.2]),
    reg_class_agnostic=True,
    loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))
rcnn_stage = dict(
    assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                  match_low_quality=False, ignore_iof_thr=-1),
    sampler=dict(type='RandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
    mask_size=28, pos_weight=-1, debug=False)

model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        _delete_=True, type='VimBackbone', arch=dict(embed_dims=embed_dims, depth=6), img_size=image_size,
        patch_size=16, discretization='zoh', drop_path_rate=0.0),
    neck=dict(
        _delete_=True, type='SimpleFPN', backbone_channel=embed_dims,
        in_channels=[embed_dims // 4, embed_dims // 2, embed_dims, embed_dims], out_channels=fpn_channels,
        num_outs=5, norm_cfg=dict(type='LN2d', requires_grad=True)),
    rpn_head=dict(in_channels=fpn_channels, feat_channels=fpn_channels),
    roi_head=dict(
        # 2 x 2 samples per RoIAlign bin (torchvision's Mask R-CNN setting) instead of mmdet's adaptive count: RoIAlign's
        # CPU backward was the largest single cost of a demo step (0.8 of 1.5 s); the same mAP, 20 % faster steps
        bbox_roi_extractor=dict(out_channels=fpn_channels, roi_layer=dict(sampling_ratio=2)),
        bbox_head=[
            bbox_head_stage,
            dict(bbox_head_stage, bbox_coder=dict(bbox_head_stage['bbox_coder'], target_stds=[0.05, 0.05, 0.1, 0.1])),
            dict(bbox_head_stage,
                 bbox_coder=dict(bbox_head_stage['bbox_coder'], target_stds=[0.033, 0.033, 0.067, 0.067])),
        ],
        mask_roi_extractor=dict(out_channels=fpn_channels, roi_layer=dict(sampling_ratio=2)),
        # 64 channels in the 4 mask convs: once the RPN finds the shapes, every stage's positive RoIs go through them
        # and they became most of a CPU step (iterations slowed from 1.5 to 2.4 s); 2.7x cheaper at 64
        mask_head=dict(in_channels=fpn_channels, conv_out_channels=64, num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=300, max_per_img=100),
        rcnn=[
            rcnn_stage,
            dict(rcnn_stage, assigner=dict(rcnn_stage['assigner'], pos_iou_thr=0.6, neg_iou_thr=0.6, min_pos_iou=0.6)),
            dict(rcnn_stage, assigner=dict(rcnn_stage['assigner'], pos_iou_thr=0.7, neg_iou_thr=0.7, min_pos_iou=0.7)),
        ]),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=20)))

dataset_type = 'ShapesDataset'
data_root = 'data/shapes/'
backend_args = None
train_pipeline = [
    dict(type='SeedFromStreamPosition'),  # resume-exact augmentation with dataloader workers
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=False),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=False),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4, num_workers=1, persistent_workers=True,
    sampler=dict(type='ResumableInfiniteSampler', shuffle=True),
    batch_sampler=dict(type='ResumableAspectRatioBatchSampler'),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), filter_cfg=dict(filter_empty_gt=True, min_size=4),
                 pipeline=train_pipeline, backend_args=backend_args))
val_dataloader = dict(
    batch_size=4, num_workers=1, persistent_workers=True, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), test_mode=True, pipeline=test_pipeline, backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'], format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator

train_cfg = dict(type='ResumableIterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[int(max_iters * 0.8)], gamma=0.1),
]
optim_wrapper = dict(
    type='GuardedOptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=1.0, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=4)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=2, save_last=True))
log_processor = dict(window_size=20)
randomness = dict(seed=0, deterministic=False)

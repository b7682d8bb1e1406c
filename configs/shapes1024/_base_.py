# The shapes1024 family: each COCO rule config, configs/vim_<rule>.py (Vim-T Cascade Mask R-CNN, the LSJ 1024
# pipeline with the polygon-safe crop, the guarded AMP optimizer with layer-wise lr decay and the resilience hooks,
# plus the rule's ssm_cfg and clip_grad), trained on ONE GPU for a few hundred iterations on the embedded shapes
# data. What changes, and only that:
#   data      ShapesDataset (projects/vim_disc/datasets/shapes.py), generated on first use into data/shapes1024/
#             at COCO-like sizes up to the LSJ target (640-1024 px), fed through the COCO LSJ pipeline unchanged
#             (flip, resize 0.1-2.0 x 1024, PolygonRandomCrop 1024, pad 1024); 5 classes in the heads
#   schedule  shapes_iters iterations at shapes_batch_size images (one GPU), validation at the end; the recipe's
#             warmup from 0.001 x lr and its two 10x drops at the same fractions of the run (88.9 %, 96.3 %)
#   lr        NOT changed: the recipe's AdamW lr (1e-4, layer-wise decay) at batch 2. AdamW's update size is the lr
#             whatever the batch, so each update is as large as a COCO update, on noisier gradients: a harder
#             stability test than the recipe's. Linear scaling from the recipe's 64 images (--auto-scale-lr,
#             1e-4 x 2 / 64 = 3.1e-6) leaves a from-scratch mask head at ln 2 for the whole run: on the CPU demo
#             (batch 2, 300 iterations) s0.loss_mask stayed at 0.69 with it and fell to 0.31 at 1e-4
#             (docs/results/cpu_lr_scaling.md)
#   weights   from scratch: no ImageNet checkpoint on the GPU machine
#   runtime   bf16 autocast (the precision; the recipe's default is fp16), logs every 10 iterations,
#             a checkpoint every 50 (what NonFiniteRollbackHook rolls back to), one seed for every rule
#
# mmengine refuses a key defined in two bases ("Duplicate key is not allowed among bases"), and every rule file's
# other base, ../vim_<rule>.py, defines every key of the recipe. So the changes live here under shapes_* names, and
# each rule file puts them in place with the same short block (a dict merges into the recipe's, a list replaces it).
# tools/analysis/six_rules_gpu.py runs all six; --iters rescales the schedule proportionally.
shapes_iters = 300
shapes_batch_size = 2
shapes_num_classes = 5  # circle, triangle, rectangle, ellipse, star
shapes_warmup_iters = 50
shapes_root = 'data/shapes1024/'
# the train and val datasets must pass the same generator arguments: they share one marker (shapes.py)
shapes_generator = dict(seed=0, num_train=200, num_val=50, min_size=640, max_size=1024)

shapes_backbone = dict(init_cfg=None)
shapes_train_dataloader = dict(
    batch_size=shapes_batch_size,
    dataset=dict(type='ShapesDataset', data_root=shapes_root, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), **shapes_generator))
shapes_val_dataloader = dict(
    dataset=dict(type='ShapesDataset', data_root=shapes_root, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), **shapes_generator))
shapes_evaluator = dict(ann_file=shapes_root + 'annotations/instances_val.json')
shapes_train_cfg = dict(max_iters=shapes_iters, val_interval=shapes_iters, dynamic_intervals=None)
shapes_param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=shapes_warmup_iters),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=shapes_iters,
         milestones=[round(shapes_iters * 0.889), round(shapes_iters * 0.963)], gamma=0.1),
]
shapes_optim_wrapper = dict(dtype='bfloat16')
shapes_default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=50, max_keep_ckpts=2))
shapes_log_processor = dict(window_size=10)
# not a key of the recipe, so set here directly: every rule sees the same initialisation and data order
randomness = dict(seed=0)

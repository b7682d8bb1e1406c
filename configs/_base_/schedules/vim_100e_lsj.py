# 100 COCO epochs at 64 images per iteration: 184,375 iterations x 64 / 118k images. The lr drops 10x at epochs
# 88 and 96 (163,889 and 177,546 iterations), after a 250-iteration linear warmup from 0.001 x lr.
max_iters = 184375
interval = 5000

train_cfg = dict(
    # IterBasedTrainLoop that resumes its data stream by position instead of replaying every batch
    type='ResumableIterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=interval,
    # the run ends between two intervals: validate the final weights too
    dynamic_intervals=[(180001, max_iters)])
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[163889, 177546], gamma=0.1),
]

# AMP in fp16 by default; bf16: --cfg-options optim_wrapper.dtype=bfloat16 (the RoI extractors already run in
# fp32: mmcv's RoIAlign has no bf16 CUDA kernel). An update with a non-finite loss or gradient is skipped on every
# rank. clip_grad is set per rule (configs/vim_<rule>.py).
optim_wrapper = dict(
    type='GuardedAmpOptimWrapper',
    dtype='float16',
    loss_scale='dynamic',
    constructor='VimLayerDecayOptimizerConstructor',
    # lr x 0.837 ** (25 - layer id): embeddings 0, layers.i i + 1, neck and heads 25 (num_layers is counted from
    # the model); no weight decay on pos_embed, norms, biases, A_log / A_b_log, D / D_b
    paramwise_cfg=dict(decay_rate=0.837),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1))
auto_scale_lr = dict(enable=False, base_batch_size=64)

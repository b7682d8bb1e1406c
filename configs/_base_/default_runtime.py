default_scope = 'mmdet'
# registers the backbone, neck, crop, optimizer pieces, loops and hooks named below and in the other bases
custom_imports = dict(imports=['projects.vim_disc'], allow_failed_imports=False)
# restarts of a preempted job (--resume) keep writing into the first start's log directory
runner_type = 'ResumableRunner'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    # log_metric_by_epoch=False: validation metrics are stamped with the iteration, not step 0
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # every 5,000 iterations (the validation interval), the newest 5 plus `last_checkpoint` for --resume
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=5000, max_keep_ckpts=5, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))

# docs/resilience.md: RNG state in every checkpoint, save + requeue on SLURM's signal, roll back after 10
# skipped (non-finite) updates in a row at half the lr, per-layer SSM statistics every 50 iterations
custom_hooks = [
    dict(type='RNGStateHook'),
    dict(type='PreemptionHook'),
    dict(type='NonFiniteRollbackHook', max_consecutive_skips=10, lr_factor=0.5, max_rollbacks=3),
    dict(type='SSMStatsHook', interval=50),
]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)

log_level = 'INFO'
load_from = None
resume = False

# Vim-T Cascade Mask R-CNN, COCO LSJ 100 epochs, third-order polynomial hold.
_base_ = './_base_/vim_cascade_mask_rcnn_lsj_100e_coco.py'

model = dict(
    backbone=dict(
        discretization='highorder',
        ssm_cfg=dict(dt_min=0.0003, dt_max=0.015, dt_scale=0.2)))
optim_wrapper = dict(clip_grad=dict(max_norm=0.5, norm_type=2))

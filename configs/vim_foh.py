# Vim-T Cascade Mask R-CNN, COCO LSJ 100 epochs, first-order hold (input linear between samples).
_base_ = './_base_/vim_cascade_mask_rcnn_lsj_100e_coco.py'

model = dict(
    backbone=dict(
        discretization='foh',
        ssm_cfg=dict(dt_min=0.0005, dt_max=0.02, dt_scale=0.25)))
optim_wrapper = dict(clip_grad=dict(max_norm=0.5, norm_type=2))

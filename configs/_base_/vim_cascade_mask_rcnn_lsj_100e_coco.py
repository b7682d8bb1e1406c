# The shared COCO recipe: Vim-T Cascade Mask R-CNN, LSJ 1024, 100 epochs. configs/vim_<rule>.py inherit it and set
# only the discretization rule, its ssm_cfg (dt_min, dt_max, dt_scale) and its gradient clipping.
_base_ = [
    './models/cascade_mask_rcnn_vim_fpn.py',
    './datasets/coco_lsj.py',
    './schedules/vim_100e_lsj.py',
    './default_runtime.py',
]

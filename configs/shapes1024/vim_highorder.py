# Vim-T Cascade Mask R-CNN, third-order polynomial hold, on the shapes data at 1024 px, sized for one GPU:
# configs/vim_highorder.py unchanged (rule, ssm_cfg, clip_grad, the whole COCO recipe) with the changes of ./_base_.py,
# put in place by the block below (the same in every rule file: mmengine refuses a key in two bases, see ./_base_.py).
_base_ = ['../vim_highorder.py', './_base_.py']

model = dict(
    backbone=_base_.shapes_backbone,
    roi_head=dict(
        bbox_head=[dict(stage, num_classes=_base_.shapes_num_classes) for stage in _base_.model.roi_head.bbox_head],
        mask_head=dict(num_classes=_base_.shapes_num_classes)))
train_dataloader = _base_.shapes_train_dataloader
val_dataloader = test_dataloader = _base_.shapes_val_dataloader
val_evaluator = test_evaluator = _base_.shapes_evaluator
train_cfg = _base_.shapes_train_cfg
param_scheduler = _base_.shapes_param_scheduler
# bf16; the recipe's lr per update, not scaled down for the batch (./_base_.py says why)
optim_wrapper = _base_.shapes_optim_wrapper
default_hooks = _base_.shapes_default_hooks
log_processor = _base_.shapes_log_processor

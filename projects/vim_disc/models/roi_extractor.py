"""RoI feature extraction in float32, so that bf16 AMP works with mmcv's CUDA RoIAlign (it has no bf16 kernel)."""
import torch
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

from mmdet.registry import MODELS


@MODELS.register_module()
class FP32SingleRoIExtractor(SingleRoIExtractor):
    """``SingleRoIExtractor`` run outside autocast on float32 features; returns float32 RoI features.

    The heads after it run under autocast again (their first layer casts back), so only RoIAlign itself pays fp32.
    """

    def forward(self, feats, rois, roi_scale_factor=None):
        device_type = rois.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return super().forward(tuple(f.float() for f in feats), rois.float(), roi_scale_factor)

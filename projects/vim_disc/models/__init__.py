from .discretizers import DISCRETIZERS, build_discretizer
from .roi_extractor import FP32SingleRoIExtractor
from .simple_fpn import LN2d, SimpleFPN
from .vim import BiMambaMixer, RMSNorm, VimBackbone

__all__ = [
    'DISCRETIZERS', 'build_discretizer', 'FP32SingleRoIExtractor', 'LN2d', 'SimpleFPN', 'BiMambaMixer', 'RMSNorm',
    'VimBackbone'
]

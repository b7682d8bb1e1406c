from .discretizers import DISCRETIZERS, build_discretizer
from .simple_fpn import LN2d, SimpleFPN
from .vim import BiMambaMixer, RMSNorm, VimBackbone

__all__ = ['DISCRETIZERS', 'build_discretizer', 'LN2d', 'SimpleFPN', 'BiMambaMixer', 'RMSNorm', 'VimBackbone']

"""vim-disc: Vision Mamba backbones with pluggable SSM discretization for MMDetection 3.x.

Importing this package registers every module (configs load it with ``custom_imports``).
"""
from .datasets import *  # noqa: F401,F403
from .engine import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403

"""Suite-wide set-up: repo root on sys.path, Triton's CPU interpreter where there is no GPU."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Triton reads TRITON_INTERPRET when it is first imported: set it before any kernel module loads.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason='needs CUDA (runs on the GPU machine via the device tool)')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip_gpu)

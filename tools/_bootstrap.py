"""Shared start-up for the command-line tools: make ``projects`` and ``kernels`` importable from the repo root.

``python tools/train.py`` puts ``tools/`` on sys.path, not the repo root (ViTDet documents the same pitfall).
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_repo_path() -> str:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    # child processes (dataloader workers, torchrun) inherit the path through the environment
    paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
    if REPO_ROOT not in paths:
        os.environ['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in paths if p])
    return REPO_ROOT

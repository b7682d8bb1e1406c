"""Shared start-up for the benchmark scripts: make ``kernels``, ``projects`` and ``configs`` importable.

``python benchmarks/benchmark_x.py`` puts ``benchmarks/`` on sys.path, not the repo root; the scripts import
each other as top-level modules (``from benchmark_scan import ...``), so code that imports one puts
``benchmarks/`` on sys.path too.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_repo_path() -> str:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    # child processes (dataloader workers, training runs) inherit the path through the environment
    paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
    if REPO_ROOT not in paths:
        os.environ['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in paths if p])
    return REPO_ROOT

"""Shared start-up for the benchmark scripts: make ``kernels``, ``projects`` and ``configs`` importable.

``python benchmarks/benchmark_x.py`` puts ``benchmarks/`` on sys.path, not the repo root, so this loads
tools/_bootstrap.py (the tools' same start-up) by its path. The scripts import each other as top-level modules
(``from benchmark_scan import ...``), so code that imports one puts ``benchmarks/`` on sys.path too.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'vim_disc_tools_bootstrap',
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools', '_bootstrap.py'))
_tools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tools)
REPO_ROOT = _tools.REPO_ROOT
setup_repo_path = _tools.setup_repo_path

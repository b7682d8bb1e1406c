"""The sm_90a compile tests' child process: Triton's CUDA backend and the ptxas it ships compile @triton.jit kernels
on a machine without a GPU, but not under TRITON_INTERPRET=1 (set suite-wide on CPU), hence a child without it."""
import os
import subprocess
import sys

import pytest

from tools.scan_compile_report import _bin

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_ptxas = pytest.mark.skipif(not os.path.exists(_bin('ptxas')), reason="triton's CUDA backend has no ptxas here")


def compiled_lines(child: str, *args: str):
    """Run the python code `child` (it prints one 'compiled ...' line per kernel); fail on a non-zero exit.
    Returns (the 'compiled' lines split into words, the child's stdout)."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    res = subprocess.run([sys.executable, '-c', child, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [line.split() for line in res.stdout.splitlines() if line.startswith('compiled')], res.stdout

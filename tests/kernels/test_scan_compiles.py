"""The scan kernels compile for sm_90a (H100/H200) on a machine without a GPU.

Triton's CPU interpreter runs the kernels as Python and so misses what only the real compiler rejects (a
loop-carried variable that changes type, a constexpr misuse, ptxas failures). This compiles every rule's
forward and backward at the launch shapes the detection recipe gets, and the flag combinations that select
other code (reverse, constant B/C, the deterministic backward, d last_state, two states per trip, a user rule),
through Triton's CUDA backend and the ptxas it ships (tools/scan_compile_report.py). It runs in a child process:
under TRITON_INTERPRET=1 (set for the whole suite on CPU) @triton.jit functions cannot be compiled.
"""

from kernels.discretization import RULES
from tests.kernels.compile_child import compiled_lines, needs_ptxas

CHILD = r'''
import sys
from kernels.scan.interface import ScanConfig, _launch, _tile_l
from tests.kernels.user_rules import ForwardEuler
from tools.scan_compile_report import compile_kernel, resources

for rule in sys.argv[1:]:
    for backward in (False, True):
        ln = _launch(0, _tile_l(ScanConfig(), 4096), 0, 0, 384, 384, 16, backward)
        k = compile_kernel(backward, ForwardEuler() if rule == 'euler' else rule, ln.block_d, ln.block_n,
                           ln.tile_l, ln.num_warps, ln.states)
        print('compiled', rule, backward, resources(k)[0], flush=True)
for name, variant in (('reverse-constantBC-fp32', dict(reverse=True, variable_bc=False, dtype='fp32')),
                      ('deterministic-dlast-fp16', dict(deterministic=True, dlast=True, dtype='fp16')),
                      ('bidirectional', dict(bidir=True)), ('bidirectional-deterministic', dict(bidir=True,
                                                                                              deterministic=True))):
    for backward in (False, True):
        k = compile_kernel(backward, 'foh', 2, 8, 16, 2, 2, **variant)  # the CPU tests' launch shape
        print('compiled', name, backward, resources(k)[0], flush=True)
'''

@needs_ptxas
def test_kernels_compile_for_sm90():
    rules = sorted(RULES) + ['euler']
    lines, stdout = compiled_lines(CHILD, *rules)
    assert len(lines) == 2 * len(rules) + 8, stdout
    assert all(0 < int(line[-1]) <= 255 for line in lines), stdout  # registers per thread, from ptxas

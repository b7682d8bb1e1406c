"""Compile the scan kernels for an H100/H200 (sm_90a) without a GPU; print registers, spills and the SASS mix.

Triton's CUDA backend and the ptxas/nvdisasm it ships are enough: no driver is needed. This is where the register
counts and per-element instruction counts in docs/performance.md come from, and it catches what Triton's CPU
interpreter does not (e.g. a loop-carried variable changing type fails only in the real compiler).

    python tools/scan_compile_report.py                          # the shipped launch shapes, every rule
    python tools/scan_compile_report.py --rules zoh --sass       # plus the SASS instruction mix
    python tools/scan_compile_report.py --tile-l 256 --block-d 1 --num-warps 1 --states 2
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kernels.discretization import RULES, get_discretizer  # noqa: E402
from kernels.scan.backward import scan_bwd_kernel  # noqa: E402
from kernels.scan.forward import scan_fwd_kernel  # noqa: E402

FP32_POINTERS = {'state_ptr', 'ws_ptr', 'A_ptr', 'D_ptr', 'bias_ptr', 'dB_ptr', 'dC_ptr', 'dA_ptr', 'dD_ptr',
                 'dbias_ptr', 'dlast_ptr'}
# runtime integers that are not multiples of 16 at the benchmark shapes (the JIT would not specialise them)
NOT_DIV16 = {'z_clamp', 'n_tiles', 'blocks_per_prog', 'n_dblocks', 'batch', 'ws_numel', 'group_size', 'n_groups'}


def _bin(name):
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', name)


def compile_kernel(backward, rule, block_d, block_n, tile_l, num_warps, states, dtype='bf16', reverse=False,
                   variable_bc=True, deterministic=False, dlast=False, bidir=False):
    """The compiled kernel (triton.compile) for sm_90a, with every pointer and stride aligned as the JIT
    specialises them at the detection shapes."""
    rule = get_discretizer(rule) if isinstance(rule, str) else rule
    kernel = scan_bwd_kernel if backward else scan_fwd_kernel
    consts = dict(COEFFS=rule.tl_coeffs, HISTORY=rule.history, HAS_CLAMP=rule.z_clamp is not None, HAS_D=True,
                  HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, VAR_B=variable_bc, VAR_C=variable_bc, REVERSE=reverse,
                  BIDIR=bidir, BLOCK_D=block_d, BLOCK_N=block_n, TILE_L=tile_l, STATES=states)
    if backward:
        consts.update(COEFFS_GRAD=rule.tl_coeffs_grad, EXP_ABAR=rule.abar_is_exp, ADJOINT_REVERSE=not reverse,
                      HAS_DLAST=dlast, DETERMINISTIC=deterministic)
    else:
        consts.update(STORE_STATE=True, ZERO_WS=not deterministic)
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = 'constexpr'
        elif name.endswith('_ptr'):
            sig[name] = '*fp32' if name in FP32_POINTERS else f'*{dtype}'
        else:
            sig[name] = 'fp32' if name == 'z_clamp' else 'i32'
    attrs = {(i,): [['tt.divisibility', 16]] for i, name in enumerate(kernel.arg_names)
             if sig[name] not in ('constexpr', 'fp32') and name not in NOT_DIV16}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': num_warps})


def resources(compiled):
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the kernel's PTX."""
    with tempfile.NamedTemporaryFile('w', suffix='.ptx', delete=False) as f:
        f.write(compiled.asm['ptx'])
    info = subprocess.run([_bin('ptxas'), '-arch=sm_90a', '-v', f.name, '-o', os.devnull], capture_output=True,
                          text=True).stderr
    os.unlink(f.name)
    regs = re.search(r'Used (\d+) registers', info)
    spill = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', info)
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def sass_mix(compiled):
    """Counter of SASS opcodes of the whole kernel (nvdisasm)."""
    with tempfile.NamedTemporaryFile('wb', suffix='.cubin', delete=False) as f:
        f.write(compiled.asm['cubin'])
    sass = subprocess.run([_bin('nvdisasm'), '-c', f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r'\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)', line)
        if m:
            ops[m.group(1)] += 1
    return ops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rules', nargs='*', default=sorted(RULES))
    parser.add_argument('--L', type=int, default=4096, help='sequence length the shipped defaults are chosen for')
    parser.add_argument('--N', type=int, default=16)
    parser.add_argument('--tile-l', type=int, default=0)
    parser.add_argument('--block-d', type=int, default=0)
    parser.add_argument('--num-warps', type=int, default=0)
    parser.add_argument('--states', type=int, default=0)
    parser.add_argument('--sass', action='store_true', help='also print the SASS opcode mix')
    parser.add_argument('--bidir', action='store_true', help='both directions in one launch (the Vim mixer\'s)')
    args = parser.parse_args()
    from kernels.scan.interface import ScanConfig, _launch, _tile_l
    cfg = ScanConfig(tile_l=args.tile_l)
    tile = _tile_l(cfg, args.L)
    for rule in args.rules:
        for backward in (False, True):
            ln = _launch(args.block_d, tile, args.num_warps, args.states, 384, 384, args.N, backward)
            compiled = compile_kernel(backward, rule, ln.block_d, ln.block_n, ln.tile_l, ln.num_warps, ln.states,
                                      bidir=args.bidir)
            regs, spill_st, spill_ld = resources(compiled)
            print(f"{'bwd' if backward else 'fwd'} {rule:9s} block_d {ln.block_d} tile {ln.tile_l} warps "
                  f"{ln.num_warps} states {ln.states}: {regs} registers, spills {spill_st}/{spill_ld} bytes",
                  flush=True)
            if args.sass:
                ops = sass_mix(compiled)
                print(f'  {sum(ops.values())} SASS instructions;', ', '.join(f'{k} {v}' for k, v in ops.most_common(12)))


if __name__ == '__main__':
    main()

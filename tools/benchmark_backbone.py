"""VimBackbone (tiny) forward + backward per rule and scan provider, with a breakdown of where the time goes.

    python tools/benchmark_backbone.py --out backbone.json --mamba-src .whl_src/mamba_ssm-2.3.2.post1.tar.gz

Providers (same backbone weights, same inputs, one run):
  triton    our fused Triton selective scan (every rule)
  mamba     mamba-ssm's CUDA selective_scan (zoh only), JIT-built from its sdist (see benchmark_scan.py)
  parallel  the PyTorch scan of kernels/parallel.py on the GPU (the reference path that needs no kernel)
Prints ms/iteration (median of triton.testing.do_bench), images/s and peak memory, then a profile of one
triton iteration grouped into scan / projections (GEMMs) / conv1d / norms / other elementwise.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

from _bootstrap import setup_repo_path

setup_repo_path()

import torch  # noqa: E402
import triton  # noqa: E402

import projects.vim_disc.models.vim as vim_module  # noqa: E402
from benchmark_scan import load_mamba_scan, mamba_scan  # noqa: E402
from kernels import RULES, selective_scan_fn  # noqa: E402
from projects.vim_disc.models import VimBackbone  # noqa: E402

PROFILE_GROUPS = (  # first match wins; names of CUDA kernels as the profiler reports them
    ('scan', ('_scan', 'chunk_carry', 'selective', 'recurrence')),
    ('projections (GEMM)', ('gemm', 'gemv', 'matmul', 'cutlass', 'sm90_', 'nvjet', 'cublas')),
    ('conv1d', ('conv', 'depthwise')),
    ('norms', ('norm', 'rsqrt', 'pow', 'mean', 'reduce')),
)


def use_provider(name, mamba_module):
    """Point the backbone's mixers at one scan implementation."""
    os.environ.pop('VIM_DISC_SCAN', None)
    if name == 'triton':
        vim_module.selective_scan_fn = selective_scan_fn
    elif name == 'parallel':
        os.environ['VIM_DISC_SCAN'] = 'parallel'  # selective_scan_fn's torch path (it handles reverse=True)
        vim_module.selective_scan_fn = selective_scan_fn
    elif name == 'mamba':
        fn = mamba_scan(mamba_module)

        def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, discretization='zoh',
                 reverse=False):
            if reverse:  # mamba's kernel scans forward only: the flips Vim does around it
                u, delta, B, C = (x.flip(-1) for x in (u, delta, B, C))
                z = z.flip(-1) if z is not None else None
            # mamba's kernel needs a unit last stride on z (the mixer passes a view of in_proj's output)
            out = fn(u, delta, A, B, C, D, z.contiguous() if z is not None else None, delta_bias, delta_softplus)
            return out.flip(-1) if reverse else out

        vim_module.selective_scan_fn = scan
    else:
        raise ValueError(name)


def step_fn(model, x, dtype):
    def step():
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)[0]
        out.float().square().mean().backward()
    return step


def measure(model, x, dtype, args):
    step = step_fn(model, x, dtype)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = triton.testing.do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8],
                                 grad_to_none=list(model.parameters()))
    return dict(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], images_per_s=x.shape[0] / ms[0] * 1e3,
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)


def profile(model, x, dtype):
    step = step_fn(model, x, dtype)
    step()
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, 'device_time_total', None) or getattr(evt, 'cuda_time_total', 0.0)
        if us <= 0 or evt.key.startswith(('ProfilerStep', 'cudaLaunch', 'cuda')):
            continue
        name = evt.key.lower()
        group = next((g for g, keys in PROFILE_GROUPS if any(k in name for k in keys)), 'other elementwise')
        totals[group] += us / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rules', nargs='+', default=list(RULES))
    parser.add_argument('--providers', nargs='+', default=['triton', 'mamba', 'parallel'])
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'])
    parser.add_argument('--warmup-ms', type=int, default=200)
    parser.add_argument('--rep-ms', type=int, default=1000)
    parser.add_argument('--mamba-src', help='mamba-ssm sdist (.tar.gz) or unpacked folder')
    parser.add_argument('--mamba-build', default='/tmp/mamba_build')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('benchmark_backbone.py needs a CUDA GPU')
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    mamba_module = load_mamba_scan(args.mamba_src, args.mamba_build) if 'mamba' in args.providers else None
    x = torch.randn(args.batch, 3, args.size, args.size, device='cuda')
    rows = []
    for rule in args.rules:
        torch.manual_seed(0)
        model = VimBackbone(arch='tiny', img_size=args.size, discretization=rule).cuda().train()
        for provider in args.providers:
            if provider == 'mamba' and (rule != 'zoh' or mamba_module is None):
                continue
            use_provider(provider, mamba_module)
            row = dict(rule=rule, provider=provider, **measure(model, x, dtype, args))
            rows.append(row)
            print(f"{rule:<10} {provider:<9} {row['ms']:8.2f} ms  {row['images_per_s']:7.2f} img/s  "
                  f"peak {row['peak_mem_gib']:.2f} GiB", flush=True)
        del model
        torch.cuda.empty_cache()
    use_provider('triton', mamba_module)
    breakdown = {}
    for rule in ('zoh', 'highorder'):
        if rule in args.rules:
            model = VimBackbone(arch='tiny', img_size=args.size, discretization=rule).cuda().train()
            breakdown[rule] = profile(model, x, dtype)
            del model
            print(f'\nwhere the time goes ({rule}, triton, ms of GPU time per iteration):')
            for group, ms in breakdown[rule].items():
                print(f'  {group:<22} {ms:8.2f}')
    base = {r['provider']: r['ms'] for r in rows if r['rule'] == 'zoh'}
    print('\nratios (same card, same run):')
    if 'mamba' in base and 'triton' in base:
        print(f"  mamba-ssm CUDA / our zoh: {base['mamba'] / base['triton']:.2f}x")
    for r in rows:
        if r['provider'] == 'triton' and 'triton' in base:
            print(f"  {r['rule']:<10} / our zoh: {r['ms'] / base['triton']:.2f}x")
    device = torch.cuda.get_device_name()
    print(f'card: {device}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(device=device, torch=torch.__version__, triton=triton.__version__, size=args.size,
                           batch=args.batch, dtype=args.dtype, rows=rows, breakdown_ms=breakdown), f, indent=1)


if __name__ == '__main__':
    main()

"""Forward and forward+backward time of the CPU scan paths, per discretization rule.

``python benchmarks/benchmark_cpu_scan.py [--rules zoh foh ...] [--repeats 5] [--out work_dirs/benchmark_cpu_scan.json]``

Providers (one line each), same inputs, fp32, delta_softplus, D and z gate, B/C (batch, N, L):
  reference   kernels.naive.selective_scan_ref: a sequential loop over L, autograd through every step
  parallel    kernels.parallel.selective_scan_parallel: the CPU training path

Shapes (batch, dim, L, N): Vim-tiny's width (192) at a short and a long sequence, and twice the width.
Time: wall clock (median and minimum) and process CPU time (median, all threads; less sensitive to
other processes sharing the cores) over --repeats after one warm-up, the providers alternating within
each repeat; forward under no_grad, forward+backward with every input requiring grad and backward from
a random upstream gradient. Inputs follow Mamba's initialisation (A = -(1..N), dt about 0.004).
Prints a table and writes JSON (torch's thread count, the CPU model, the load average).
"""
import argparse
import json
import os
import os.path as osp
import platform
import statistics
import time

from _bootstrap import setup_repo_path

setup_repo_path()

import torch  # noqa: E402

from kernels.discretization import RULES  # noqa: E402
from kernels.naive import selective_scan_ref  # noqa: E402
from kernels.parallel import selective_scan_parallel  # noqa: E402

PROVIDERS = {'reference': selective_scan_ref, 'parallel': selective_scan_parallel}
SHAPES = [(2, 192, 64, 16), (2, 192, 256, 16), (2, 384, 256, 16)]


def make_inputs(batch, dim, length, n_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) - 2.0,
        A=-torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1),  # Mamba's S4D-real init
        B=torch.randn(batch, n_state, length, generator=g),
        C=torch.randn(batch, n_state, length, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.rand(dim, generator=g) - 4.0)


def _steps(fn, inputs, rule):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    grad_out = torch.randn_like(inputs['u'])

    def forward():
        with torch.no_grad():
            fn(**inputs, delta_softplus=True, discretization=rule)

    def forward_backward():
        fn(**leaves, delta_softplus=True, discretization=rule).backward(grad_out)
    return dict(fwd=forward, fwd_bwd=forward_backward)


def time_providers(providers, inputs, rule, repeats):
    """Median and minimum ms per provider and pass; providers alternate within each repeat so that
    load from other processes falls on all of them alike."""
    steps = {name: _steps(PROVIDERS[name], inputs, rule) for name in providers}
    wall = {name: {key: [] for key in ('fwd', 'fwd_bwd')} for name in providers}
    cpu = {name: {key: [] for key in ('fwd', 'fwd_bwd')} for name in providers}
    for key in ('fwd', 'fwd_bwd'):
        for name in providers:
            steps[name][key]()  # warm-up
        for _ in range(repeats):
            for name in providers:
                start, start_cpu = time.perf_counter(), time.process_time()
                steps[name][key]()
                wall[name][key].append((time.perf_counter() - start) * 1e3)
                cpu[name][key].append((time.process_time() - start_cpu) * 1e3)
    return {name: {f'{key}_ms_median': statistics.median(t) for key, t in wall[name].items()} |
            {f'{key}_ms_min': min(t) for key, t in wall[name].items()} |
            {f'{key}_cpu_ms_median': statistics.median(t) for key, t in cpu[name].items()}
            for name in providers}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rules', nargs='+', default=sorted(RULES), choices=sorted(RULES))
    parser.add_argument('--providers', nargs='+', default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument('--shapes', nargs='+', type=int, default=None, metavar='B D L N',
                        help='one or more (batch, dim, L, N) quadruples instead of the defaults')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s)')
    parser.add_argument('--out', default='work_dirs/benchmark_cpu_scan.json')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [tuple(args.shapes[i:i + 4]) for i in range(0, len(args.shapes), 4)]

    rows = []
    load_before = os.getloadavg()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {_cpu_model()}, '
          f'load average {load_before[0]:.2f} (other processes share these cores: compare rows of one run)')
    print(f'{"rule":<10} {"provider":<10} {"B,D,L,N":<15} {"fwd ms med/min":>15} {"fwd+bwd ms med/min":>19} '
          f'{"fwd+bwd cpu ms":>15}')
    for shape in shapes:
        inputs = make_inputs(*shape)
        for rule in args.rules:
            for provider, res in time_providers(args.providers, inputs, rule, args.repeats).items():
                rows.append(dict(rule=rule, provider=provider, shape=list(shape), **res))
                print(f'{rule:<10} {provider:<10} {",".join(map(str, shape)):<15} '
                      f'{res["fwd_ms_median"]:>7.1f} /{res["fwd_ms_min"]:>6.1f} '
                      f'{res["fwd_bwd_ms_median"]:>10.1f} /{res["fwd_bwd_ms_min"]:>7.1f} '
                      f'{res["fwd_bwd_cpu_ms_median"]:>15.1f}', flush=True)

    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                       cpu=_cpu_model(), repeats=args.repeats, load_average_before=load_before[0],
                       load_average_after=os.getloadavg()[0], rows=rows), f, indent=1)
    print(f'wrote {args.out}')


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == '__main__':
    main()

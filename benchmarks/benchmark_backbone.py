"""VimBackbone forward + backward per rule, scan provider and execution mode, with a profile of where the time goes.

    python benchmarks/benchmark_backbone.py --out backbone.json --mamba-src .whl_src/mamba_ssm-2.3.2.post1.tar.gz

Every row uses the same backbone weights and the same inputs, in one process: Vim-T (default), 1024 x 1024,
batch 2, bf16 autocast, loss = mean(out^2), forward + backward, as a training step runs the backbone.
Providers (what the mixer's one `bidirectional_selective_scan` call runs):
  triton    ours: the default function (fused Triton kernels on CUDA), every rule
  parallel  the same function with VIM_DISC_SCAN=parallel (the PyTorch scan, no kernel of ours)
  mamba     mamba-ssm's CUDA selective_scan (zoh only), JIT-built from its sdist (benchmark_scan.py), called
            twice: direction 1 on time-flipped, contiguous copies, flipped back (Vim's own way)
Modes: eager, and captured (the backbone's own CUDA-graph capture: VimBackbone(cuda_graph=True)).
Prints ms per step (median, p20-p80 of triton.testing.do_bench), images/s, peak memory; a torch.profiler
profile of ours (eager and captured): top kernels, groups, GPU busy fraction; with --stats, the cost of an
SSM-statistics step; last a short table with the issue's ratios. --out writes every number as JSON.
"""
import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict

from _bootstrap import setup_repo_path

setup_repo_path()

import torch  # noqa: E402
import triton  # noqa: E402

import projects.vim_disc.models.vim as vim_module  # noqa: E402
from benchmark_scan import load_mamba_scan, mamba_scan  # noqa: E402
from kernels import RULES  # noqa: E402
from projects.vim_disc.models import VimBackbone  # noqa: E402
from projects.vim_disc.models.cuda_graph import cuda_graph_state  # noqa: E402

# the mixer's scan as vim.py imports it (ours); use_provider swaps the module attribute
DEFAULT_SCAN = getattr(vim_module, 'bidirectional_selective_scan', None)
PROVIDERS = ('triton', 'parallel', 'mamba')
MODES = ('eager', 'captured')
PROFILE_GROUPS = (  # first match wins; lower-cased names of CUDA kernels as the profiler reports them
    ('scan', ('scan_fwd', 'scan_bwd', 'selective_scan', 'chunk_carry', 'recurrence', 'scan')),
    ('conv1d', ('conv1d', 'causal_conv', 'depthwise', 'conv_depthwise')),
    ('rmsnorm', ('rms_norm', 'rmsnorm', 'layer_norm', 'norm', 'rsqrt')),
    ('GEMM', ('gemm', 'gemv', 'matmul', 'cutlass', 'sm90_', 'sm80_', 'nvjet', 'cublas', 'xmma')),
)
OTHER_GROUP = 'other'


# ----------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------
def mamba_bidirectional(mamba_module):
    """`bidirectional_selective_scan` on mamba-ssm's CUDA kernel (`mamba_module`: a built `selective_scan_cuda`,
    or anything with its fwd/bwd). mamba's kernel checks u/delta/z/B/C.stride(-1) == 1 and scans forward only:
    every tensor handed to it is made contiguous, and direction 1 runs on flipped copies (flipped back)."""
    scan = mamba_scan(mamba_module)

    def bidirectional_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                     discretization='zoh', **unused):
        rule = getattr(discretization, 'name', discretization)
        if rule != 'zoh':
            raise ValueError(f"mamba-ssm's scan discretizes with zoh only, got {rule!r}")
        outs = []
        for r in (0, 1):
            seqs = [u[:, r], delta[:, r], B[:, r], C[:, r], z]
            if r == 1:
                seqs = [x.flip(-1) if x is not None else None for x in seqs]
            u_r, delta_r, B_r, C_r, z_r = (x.contiguous() if x is not None else None for x in seqs)
            out = scan(u_r, delta_r, A[r].contiguous(), B_r, C_r, None if D is None else D[r].contiguous(), z_r,
                       None if delta_bias is None else delta_bias[r].contiguous(), delta_softplus)
            outs.append(out.flip(-1) if r == 1 else out)
        return torch.stack(outs, 1)

    return bidirectional_selective_scan


def use_provider(name, mamba_module=None):
    """Point every mixer of every VimBackbone at one scan implementation (a process-wide switch)."""
    if DEFAULT_SCAN is None:
        raise RuntimeError('projects/vim_disc/models/vim.py has no module-level bidirectional_selective_scan: '
                           'this benchmark times the mixer that calls it once per layer for both directions')
    os.environ.pop('VIM_DISC_SCAN', None)
    if name == 'triton':
        vim_module.bidirectional_selective_scan = DEFAULT_SCAN
    elif name == 'parallel':
        os.environ['VIM_DISC_SCAN'] = 'parallel'  # the default function's torch path (two reverse-aware scans)
        vim_module.bidirectional_selective_scan = DEFAULT_SCAN
    elif name == 'mamba':
        if mamba_module is None:
            raise ValueError("provider 'mamba' needs mamba-ssm's built selective_scan_cuda module")
        vim_module.bidirectional_selective_scan = mamba_bidirectional(mamba_module)
    else:
        raise ValueError(f'unknown provider {name!r}; valid: {PROVIDERS}')


def build_backbone(args, rule, state, mode):
    model = VimBackbone(arch=args.arch, img_size=args.size, discretization=rule,
                        cuda_graph=mode == 'captured').cuda().train()
    model.load_state_dict(state)
    return model


def free():
    """Return the memory of the backbones (and their graphs) the caller has dropped."""
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def step_fn(model, x, dtype):
    def step():
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)[0]
        out.float().square().mean().backward()
    return step


def measure(step, params, batch, args):
    """Median and p20/p80 ms of one step; peak memory from the first call on (a capture included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()  # a captured backbone captures on its third call (cuda_graph_warmup=2), inside do_bench's warm-up
    ms = triton.testing.do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8],
                                 grad_to_none=params)
    return dict(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], images_per_s=batch / ms[0] * 1e3,
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)


def wall_ms(step, params, steps):
    """Wall-clock ms per step over `steps` back-to-back steps (grads cleared before each), synchronized before
    and after (host clock)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        for p in params:
            p.grad = None
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


# ----------------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------------
def group_of(name):
    name = name.lower()
    return next((g for g, keys in PROFILE_GROUPS if any(k in name for k in keys)), OTHER_GROUP)


def profile(step, params, warmup, steps, top):
    """Every GPU activity (kernels, memcpy, memset) of `steps` steps under torch.profiler (CUDA activity), after
    `warmup` steps (a captured backbone captures in those): top kernels by total time, time per group, and
    the kernel time per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled_wall = wall_ms(step, params, steps)
    per_name = defaultdict(lambda: [0, 0.0])
    starts, ends = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()  # (device_time_total reads 0 for events without use_device)
        per_name[e.name][0] += 1
        per_name[e.name][1] += us / 1e3
        starts.append(e.time_range.start)
        ends.append(e.time_range.end)
    kernel_ms = sum(ms for _, ms in per_name.values())
    groups = defaultdict(float)
    for name, (_, ms) in per_name.items():
        groups[group_of(name)] += ms / steps
    table = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(
        steps=steps, activities=sum(c for c, _ in per_name.values()) // steps,
        kernel_ms_per_step=kernel_ms / steps, profiled_wall_ms_per_step=profiled_wall,
        kernel_span_ms_per_step=(max(ends) - min(starts)) / 1e3 / steps if starts else 0.0,
        groups_ms_per_step=dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        top_kernels=[dict(name=n, calls=c, total_ms=ms, ms_per_step=ms / steps) for n, (c, ms) in table])


def print_profile(label, prof):
    print(f"\nprofile {label}: {prof['steps']} steps, {prof['activities']} GPU activities per step, "
          f"kernel time {prof['kernel_ms_per_step']:.2f} ms per step, wall {prof['wall_ms_per_step']:.2f} ms, "
          f"busy {prof['busy_fraction']:.0%} ({prof['busy_source']})")
    print(f"  {'kernel':<90} {'calls':>6} {'total ms':>9}")
    for k in prof['top_kernels']:
        print(f"  {k['name'][:90]:<90} {k['calls']:6d} {k['total_ms']:9.2f}")
    print('  per step by group: ' + ', '.join(f'{g} {ms:.2f} ms' for g, ms in prof['groups_ms_per_step'].items()))


def profile_ours(args, state, x, dtype):
    """Ours (triton provider) eager and captured: profile + GPU busy fraction = kernel time / wall.

    Wall = host clock over --profile-steps steps run without the profiler, synchronized before and after.
    Kernels replayed inside a CUDA graph may not reach the profiler on every torch/CUPTI: if the captured
    profile sees less than half of the eager profile's kernel time, the captured busy fraction falls back
    to the eager kernel time over the captured wall (labelled so)."""
    use_provider('triton')
    result = {}
    for mode in [m for m in MODES if m in args.modes]:  # eager first: the captured fallback needs it
        model = build_backbone(args, args.profile_rule, state, mode)
        params = list(model.parameters())
        step = step_fn(model, x, dtype)
        prof = profile(step, params, args.profile_warmup, args.profile_steps, args.top)
        prof['wall_ms_per_step'] = wall_ms(step, params, args.profile_steps)
        prof['busy_fraction'] = prof['kernel_ms_per_step'] / prof['wall_ms_per_step']
        prof['busy_source'] = 'kernel time in this profile / wall'
        eager = result.get('eager')
        if mode == 'captured' and eager and prof['kernel_ms_per_step'] < 0.5 * eager['kernel_ms_per_step']:
            prof['graph_kernels_visible'] = False
            prof['busy_fraction'] = eager['kernel_ms_per_step'] / prof['wall_ms_per_step']
            prof['busy_source'] = ('eager profile kernel time / captured wall (kernels replayed in the graph '
                                   'are not seen by the profiler on this torch)')
        elif mode == 'captured':
            prof['graph_kernels_visible'] = True
        result[mode] = prof
        print_profile(f'ours {args.profile_rule} {mode}', prof)
        del model, params, step
        free()
    return result


# ----------------------------------------------------------------------------------------------------
# SSM statistics
# ----------------------------------------------------------------------------------------------------
def stats_cost(args, state, x, dtype):
    """A step with every mixer's record_stats=True plus SSMStatsHook's per-mixer summaries (its forward hook:
    summarize_direction over mixer.ssm_stats, then drop them) against the same step without (plain), and the
    step of a non-recording iteration with the hooks installed (idle), which must cost nothing; eager and
    captured. `mixers_recorded`: how many mixers handed over statistics in a recording step."""
    from projects.vim_disc.engine.hooks import summarize_direction
    use_provider('triton')
    rows = {}
    recorded = set()

    def summaries(mixer, inputs, output):
        if mixer.ssm_stats is None:
            return
        for s in mixer.ssm_stats.values():
            summarize_direction(s['delta'], s['A'], mixer.discretizer)
        mixer.ssm_stats = None
        recorded.add(id(mixer))

    for mode in args.modes:
        model = build_backbone(args, args.profile_rule, state, mode)
        params = list(model.parameters())
        step = step_fn(model, x, dtype)
        rows[f'{mode}_plain'] = measure(step, params, x.shape[0], args)
        handles = [m.register_forward_hook(summaries) for m in model.mixers]
        for label, record in ((f'{mode}_idle', False), (f'{mode}_recording', True)):
            for m in model.mixers:
                m.record_stats = record
            recorded.clear()
            try:
                rows[label] = measure(step, params, x.shape[0], args)
                rows[label]['mixers_recorded'] = len(recorded)
            except Exception as exc:  # noqa: BLE001  (a data point: e.g. a capture that refuses hooks)
                rows[label] = dict(error=repr(exc)[:500])
            for m in model.mixers:
                m.record_stats, m.ssm_stats = False, None
        for h in handles:
            h.remove()
        del model, params, step, handles
        free()
    for label, row in rows.items():
        base = rows.get(label.split('_')[0] + '_plain')
        if 'ms' in row and base:
            row['vs_plain'] = row['ms'] / base['ms']
        print(f"stats {label:<18} " + (f"{row['ms']:8.2f} ms  {row.get('vs_plain', 1.0):.3f}x of plain  "
                                        f"mixers recorded {row.get('mixers_recorded', 0)}"
                                        if 'ms' in row else row['error']), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def row_ms(rows, rule, provider, mode):
    hit = [r for r in rows if (r['rule'], r['provider'], r['mode']) == (rule, provider, mode) and 'ms' in r]
    return hit[0]['ms'] if hit else None


def ratios(rows):
    """The issue's targets: mamba-eager / ours-captured, mamba-captured / ours-captured (> 1: ours faster), and
    every rule of ours / our zoh, both captured (< 1: faster than zoh)."""
    ours = row_ms(rows, 'zoh', 'triton', 'captured')
    mamba_eager, mamba_captured = row_ms(rows, 'zoh', 'mamba', 'eager'), row_ms(rows, 'zoh', 'mamba', 'captured')
    res = dict(ours_captured_vs_mamba_eager=mamba_eager / ours if ours and mamba_eager else None,
               ours_captured_vs_mamba_captured=mamba_captured / ours if ours and mamba_captured else None,
               rule_vs_zoh_captured={})
    for r in rows:
        if r['provider'] == 'triton' and r['mode'] == 'captured' and 'ms' in r and ours:
            res['rule_vs_zoh_captured'][r['rule']] = r['ms'] / ours
    return res


def print_summary(rows, res, device, prof=None):
    print(f"\n{'rule':<10} {'provider':<9} {'mode':<9} {'ms':>8} {'p20-p80':>15} {'img/s':>7} {'peak GiB':>8}")
    for r in rows:
        if 'ms' in r:
            print(f"{r['rule']:<10} {r['provider']:<9} {r['mode']:<9} {r['ms']:8.2f} "
                  f"{r['ms_p20']:7.2f}-{r['ms_p80']:<7.2f} {r['images_per_s']:7.2f} {r['peak_mem_gib']:8.2f}")
        else:
            print(f"{r['rule']:<10} {r['provider']:<9} {r['mode']:<9} failed: {r['error'][:80]}")
    fmt = (lambda v: f'{v:.2f}x' if v is not None else 'n/a')
    print(f"ours captured vs mamba eager (mamba ms / ours ms):    {fmt(res['ours_captured_vs_mamba_eager'])}")
    print(f"ours captured vs mamba captured (mamba ms / ours ms): {fmt(res['ours_captured_vs_mamba_captured'])}")
    for rule, v in res['rule_vs_zoh_captured'].items():
        print(f'  {rule:<10} / our zoh (captured): {v:.2f}x')
    for mode, p in (prof or {}).items():
        if mode in MODES:
            print(f"GPU busy, ours {mode}: {p['busy_fraction']:.0%} ({p['busy_source']})")
    print(f'card: {device}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rules', nargs='+', default=list(RULES), choices=list(RULES))
    parser.add_argument('--providers', nargs='+', default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--arch', default='tiny', choices=sorted(VimBackbone.arch_zoo))
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'])
    parser.add_argument('--warmup-ms', type=int, default=200)
    parser.add_argument('--rep-ms', type=int, default=1000)
    parser.add_argument('--no-profile', action='store_true', help='skip the profile of ours')
    parser.add_argument('--profile-rule', default='zoh', choices=list(RULES))
    parser.add_argument('--profile-warmup', type=int, default=3, help='steps before the profiled ones')
    parser.add_argument('--profile-steps', type=int, default=5)
    parser.add_argument('--top', type=int, default=25, help='kernels listed per profile')
    parser.add_argument('--stats', action='store_true', help='also time a step that records SSM statistics')
    parser.add_argument('--mamba-src', help='mamba-ssm sdist (.tar.gz) or unpacked folder')
    parser.add_argument('--mamba-build', default='/tmp/mamba_build')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('benchmark_backbone.py needs a CUDA GPU')
    if DEFAULT_SCAN is None:
        sys.exit('projects/vim_disc/models/vim.py has no module-level bidirectional_selective_scan to time')
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    mamba_module = load_mamba_scan(args.mamba_src, args.mamba_build) if 'mamba' in args.providers else None
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device='cuda')
    rows, states = [], {}
    for rule in args.rules:
        torch.manual_seed(0)
        states[rule] = {k: v.cuda() for k, v in
                        VimBackbone(arch=args.arch, img_size=args.size, discretization=rule).state_dict().items()}
        for provider in args.providers:
            if provider == 'mamba' and (rule != 'zoh' or mamba_module is None):
                continue
            use_provider(provider, mamba_module)
            for mode in args.modes:  # a fresh backbone per row: a capture records the provider of its time
                row = dict(rule=rule, provider=provider, mode=mode)
                try:
                    model = build_backbone(args, rule, states[rule], mode)
                    row.update(measure(step_fn(model, x, dtype), list(model.parameters()), args.batch, args))
                    st = cuda_graph_state(model)  # a captured row that never replayed would time eager steps
                    row.update(graph_captures=st.captures, graph_replays=st.replays, eager_calls=st.eager_calls,
                               graph_disabled=st.disabled)
                    print(f"{rule:<10} {provider:<9} {mode:<9} {row['ms']:8.2f} ms ({row['ms_p20']:.2f}-"
                          f"{row['ms_p80']:.2f})  {row['images_per_s']:7.2f} img/s  peak {row['peak_mem_gib']:.2f} GiB",
                          flush=True)
                except Exception as exc:  # noqa: BLE001  (one failing row must not lose the others)
                    row['error'] = repr(exc)[:500]
                    print(f'{rule:<10} {provider:<9} {mode:<9} failed: {row["error"]}', flush=True)
                model = None
                free()
                rows.append(row)
    if args.profile_rule not in states:
        torch.manual_seed(0)
        states[args.profile_rule] = VimBackbone(arch=args.arch, img_size=args.size,
                                                discretization=args.profile_rule).cuda().state_dict()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  argv=sys.argv, arch=args.arch, size=args.size, batch=args.batch, dtype=args.dtype, rows=rows)
    for key, wanted, fn in (('profile', not args.no_profile, profile_ours), ('stats', args.stats, stats_cost)):
        if wanted:
            try:  # the rows above are kept whatever happens here
                result[key] = fn(args, states[args.profile_rule], x, dtype)
            except Exception as exc:  # noqa: BLE001
                result[key] = dict(error=repr(exc)[:500])
                print(f'{key} failed: {exc!r}', flush=True)
                free()
    use_provider('triton')
    result['ratios'] = ratios(rows)
    print_summary(rows, result['ratios'], result['device'], result.get('profile'))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()

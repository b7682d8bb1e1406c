"""The short table of one `scripts/gpu_backbone.sh` run: the issue's backbone and detector targets from its JSON.

    python tools/summarize_backbone_run.py OUT_DIR

backbone.json (+ backbone_rules.json, backbone_two_launch.json) and train_*.json, as the script writes them.
"""
import json
import os
import sys


def load(out, name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


def ms(rows, rule, provider, mode):
    hit = [r for r in rows if (r['rule'], r['provider'], r['mode']) == (rule, provider, mode) and 'ms' in r]
    return hit[0]['ms'] if hit else None


def backbone(bb, two):
    rows = bb['rows']
    print(f"backbone {bb['arch']} {bb['size']}px batch {bb['batch']} {bb['dtype']} on {bb['device']}:")
    for r in rows:
        graph = f" replays {r.get('graph_replays')}" if r['mode'] == 'captured' else ''
        print(f"  {r['rule']:<10}{r['provider']:<8}{r['mode']:<9}" +
              (f"{r['ms']:8.2f} ms  peak {r['peak_mem_gib']:.2f} GiB{graph}" if 'ms' in r else r['error'][:70]))
    for r in (two or {}).get('rows', []):
        if 'ms' in r:
            print(f"  {r['rule']:<10}two-launch scan {r['mode']:<9}{r['ms']:8.2f} ms")
    ours = ms(rows, 'zoh', 'triton', 'captured')
    for label, other in (('vs mamba eager (must >= 2x)', ms(rows, 'zoh', 'mamba', 'eager')),
                         ('vs mamba captured (must >= 1.3x)', ms(rows, 'zoh', 'mamba', 'captured'))):
        print(f'  ours captured {label}: ' + (f'{other / ours:.2f}x' if ours and other else 'n/a'))
    others = [(r['ms'] / ours, r['rule']) for r in rows
              if ours and r['provider'] == 'triton' and r['mode'] == 'captured' and 'ms' in r]
    if others:
        print(f'  worst rule vs our zoh, captured (must <= 1.25x): {max(others)[1]} {max(others)[0]:.2f}x')
    for mode, p in bb.get('profile', {}).items():
        if isinstance(p, dict) and 'busy_fraction' in p:
            print(f"  GPU busy {mode} (must >= 90%): {p['busy_fraction']:.0%}  kernels {p['kernel_ms_per_step']:.1f} ms"
                  f" / wall {p['wall_ms_per_step']:.1f} ms; " +
                  ', '.join(f'{g} {v:.1f}' for g, v in p['groups_ms_per_step'].items()))
    for label, r in bb.get('stats', {}).items():
        if 'ms' in r:
            print(f"  stats {label:<18}{r['ms']:8.2f} ms  {r.get('vs_plain', 1):.3f}x")


def train(results):
    print('detector step (benchmarks/benchmark_train.py):')
    by = {}
    for r in results:
        by[(r['config'], r['precision'], r['cuda_graph'])] = r
        print(f"  {os.path.basename(r['config']):<18}{r['precision']:<6}graph {r['cuda_graph']:<4}"
              f"{r['s_per_iter']:.3f} s/iter  peak {r['peak_mem_gib']:.2f} GiB (steady {r['peak_mem_steady_gib']:.2f})"
              f"  non-finite {r['nonfinite_iters']}  graph {r.get('graph')}")
    for (config, precision, graph), r in by.items():
        fp32 = by.get((config, 'fp32', graph))
        if precision == 'bf16' and fp32:
            print(f"  {os.path.basename(config)} graph {graph}: bf16 {fp32['s_per_iter'] / r['s_per_iter']:.2f}x "
                  f'faster than fp32 (must >= 1.3x)')


def main():
    out = sys.argv[1]
    bb = load(out, 'backbone.json')
    if bb:
        bb['rows'] += (load(out, 'backbone_rules.json') or {}).get('rows', [])  # the other rules, same run
        backbone(bb, load(out, 'backbone_two_launch.json'))
    results = [r for name in ('train_zoh.json', 'train_rules.json') for r in (load(out, name) or {}).get('results', [])]
    if results:
        train(results)


if __name__ == '__main__':
    main()

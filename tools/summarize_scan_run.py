"""The short table printed last by scripts/gpu_scan.sh: tests, mamba's grid, benchmark, sweep (from OUT_DIR)."""
import json
import os
import re
import sys
from collections import defaultdict

# benchmarks/benchmark_scan.py owns the table (its scripts import each other as top-level modules)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def tests(out):
    log = open(os.path.join(out, 'log.txt')).read() if os.path.exists(os.path.join(out, 'log.txt')) else ''
    for line in re.findall(r'^=+ .*(?:passed|failed|error).* in .*$', log, re.M):
        print('pytest:', line.strip('= '))
    for line in re.findall(r'^FAILED .*$', log, re.M)[:15]:
        print(' ', line[:160])


def grid(out):
    rows = load(os.path.join(out, 'grid.json'))
    if not rows:
        return
    cases = defaultdict(lambda: [0, 0, 0, 0])  # rule: cases, ours failing, mamba failing, both
    ratio = defaultdict(float)  # gradient: max ours/mamba error ratio
    for r in rows:
        c = cases[r['rule']]
        c[0] += 1
        ours_bad = any(not v['ours_ok'] for v in r['checks'].values())
        mamba_bad = any(not v.get('mamba_ok', True) for v in r['checks'].values())
        c[1] += ours_bad
        c[2] += mamba_bad
        c[3] += ours_bad and mamba_bad
        for name, v in r['checks'].items():
            if 'mamba' in v and v['mamba'] > 0:
                ratio[name] = max(ratio[name], v['ours'] / v['mamba'])
    print('grid: rule cases ours-outside-tol mamba-outside-tol both')
    for rule, c in cases.items():
        print(f'  {rule:9s} {c[0]:4d} {c[1]:4d} {c[2]:4d} {c[3]:4d}')
    if ratio:
        print('  max ours/mamba error:', ' '.join(f'{k} {v:.2f}' for k, v in sorted(ratio.items())))


def bench(out):
    res = load(os.path.join(out, 'scan.json'))
    if not res:
        return
    print('card:', res.get('card'))
    from benchmark_scan import print_table
    print_table(res['rows'])


def sweep(out):
    res = load(os.path.join(out, 'sweep.json'))
    if not res:
        return
    best = {}
    for r in res['sweep']:
        key = (r['shape'], r['rule'], r['phase'])
        t = r['fwd_bwd_ms'][0] if r['phase'] == 'bwd' else r['fwd_ms'][0]
        if key not in best or t < best[key][0]:
            best[key] = (t, r['tile_l'], r['block_d'], r['num_warps'], r.get('states'))
    print('sweep best (ms, tile_l, block_d, warps, states):')
    for k, v in sorted(best.items()):
        print(f'  {k[0]:9s} {k[1]:9s} {k[2]}: {v[0]:.3f} ms  tile {v[1]} block_d {v[2]} warps {v[3]} states {v[4]}')
    # per tile_l: best forward + best backward share (fwd+bwd - fwd of that row), the tile is shared
    by_tile = defaultdict(dict)
    for r in res['sweep']:
        key = (r['shape'], r['rule'], r['tile_l'])
        if r['phase'] == 'fwd':
            by_tile[key]['fwd'] = min(by_tile[key].get('fwd', 9e9), r['fwd_ms'][0])
        else:
            by_tile[key]['bwd'] = min(by_tile[key].get('bwd', 9e9), r['fwd_bwd_ms'][0] - r['fwd_ms'][0])
    print('  per tile_l, best fwd + best bwd share (ms):')
    for k, v in sorted(by_tile.items()):
        print(f"    {k[0]:9s} {k[1]:9s} tile {k[2]:4d}: fwd {v.get('fwd', float('nan')):.3f} "
              f"bwd {v.get('bwd', float('nan')):.3f}")


if __name__ == '__main__':
    out = sys.argv[1]
    for part in (tests, grid, bench, sweep):
        try:
            part(out)
        except Exception as exc:  # a partial run still prints what it has
            print(f'{part.__name__}: {exc!r}')

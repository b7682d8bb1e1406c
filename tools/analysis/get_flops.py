"""Parameters and forward FLOPs of a config's Vim backbone, with the selective scan counted per rule.

``python tools/analysis/get_flops.py CONFIG [--shape 1024 1024] [--batch 1] [--json OUT.json]``

Tracers (fvcore, torch's FlopCounterMode) see matmuls and convolutions but not the inside of a Triton
kernel, so the scan is counted analytically. One FLOP is one +, -, x, / or exp; selects and compares are free;
a matmul or convolution costs 2 per multiply-accumulate. Per layer (both directions of the bidirectional
mixer):

  projections   in_proj, x_proj, dt_proj (its matmul; the bias goes to the scan): 2 * tokens * in * out; out_proj
                takes both directions at once (K = 2 * d_inner: the mean of the directions is folded into it)
  conv1d        depthwise causal conv over the padded sequence: 2 * (L + d_conv - 1) * d_inner * d_conv
  scan          per element of (B, D, L, N), D = d_inner, N = d_state:
                  coefficients   Abar(z), w_0..w_K(z): the rule's cost (COEFF_FLOPS, counted in its Triton code)
                  input term     v = B u, delta * sum_{j<=K} w_j v_{t-j}:   2K + 3
                  recurrence     z = delta * a, h = Abar h + input, y += C h: 5
  elementwise   per (B, D, L) and direction: conv bias 1, silu 4, delta + bias 1, softplus 3, D u + y 2,
                gate silu 4 + product 1 (= 16); RMSNorm 4 and the residual add 1 per (B, L, d_model)

Prints a per-layer table, a per-rule comparison of the scan at this shape, and the parameter count of the
built backbone; ``--json`` saves the same numbers.
"""
import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmengine.config import Config, DictAction  # noqa: E402

from kernels.discretization import RULES, get_discretizer  # noqa: E402

# FLOPs per element to evaluate Abar(z) and w_0..w_K(z) in the fused kernel's forward (each rule's
# `tl_coeffs` in kernels/discretization.py, counted after common-subexpression elimination, i.e. e^z once):
#   zoh        e^z                                                                       1
#   bilinear   q = 1/(2 - z) 2, Abar = 4q - 1 2, w_0 = 2q 1                              5
#   rk4        Abar: Horner of degree 4 8, w_0: degree 2 4, w_1: degree 3 6              18
#   hold rules tl_chi up to order K: |z| and -z 2, the 16-term series to S_4 30, S_3..S_0 11, e^z 1,
#              1/z 1, the recursion r_0..r_K (2, 2, 3, 3), chi_m = e^z S_m K+1; then the Lagrange sums
#   foh        45 + 4 + 2, w_0 = chi_0 - chi_1 1                                         52
#   poly       45 + 7 + 3, weights 4 + 2 + 2                                             63
#   highorder  45 + 10 + 4, weights 5 + 5 + 5 + 5                                        79
# A rule added later may declare its own cost as a `coeff_flops` class attribute.
COEFF_FLOPS = dict(zoh=1, bilinear=5, rk4=18, foh=52, poly=63, highorder=79)
RECURRENCE_FLOPS = 5  # z = delta * a; h = Abar h + input (2); y += C h (2)
ELEMENTWISE_PER_CHANNEL = 16  # per (B, D, L) and direction, see the module docstring
BLOCK_PER_FEATURE = 5  # RMSNorm 4 and the residual add 1 per (B, L, d_model)


def coeff_flops(rule):
    """FLOPs per (B, D, L, N) element to evaluate one rule's coefficients (see COEFF_FLOPS)."""
    disc = get_discretizer(rule)
    own = getattr(disc, 'coeff_flops', None)
    if own is not None:
        return int(own)
    if disc.name not in COEFF_FLOPS:
        raise KeyError(f'no coefficient cost for rule {disc.name!r}: give its class a coeff_flops attribute')
    return COEFF_FLOPS[disc.name]


def scan_flops_per_element(coef, history):
    """FLOPs per (B, D, L, N) element of one scan: (coefficients, input term, recurrence)."""
    return coef, 2 * history + 3, RECURRENCE_FLOPS


def mixer_flops(tokens, d_model, d_inner, d_state, dt_rank, d_conv, coef, history, batch=1, directions=2):
    """Forward FLOPs of one Vim block (norm + bidirectional mixer + residual) on `batch` x `tokens` tokens.

    Returns a dict of parts: projections, conv1d, scan_coef, scan_input, scan_recurrence, elementwise, total.
    """
    bl = batch * tokens
    projections = (2 * bl * d_model * 2 * d_inner  # in_proj -> x and the gate
                   + directions * 2 * bl * d_inner * (dt_rank + 2 * d_state)  # x_proj -> dt, B, C
                   + directions * 2 * bl * dt_rank * d_inner  # dt_proj
                   + directions * 2 * bl * d_inner * d_model)  # out_proj over both directions' outputs
    conv1d = directions * 2 * batch * (tokens + d_conv - 1) * d_inner * d_conv
    elements = directions * bl * d_inner * d_state
    per_coef, per_input, per_recurrence = scan_flops_per_element(coef, history)
    elementwise = directions * bl * d_inner * ELEMENTWISE_PER_CHANNEL + bl * d_model * BLOCK_PER_FEATURE
    parts = dict(projections=projections, conv1d=conv1d, scan_coef=elements * per_coef,
                 scan_input=elements * per_input, scan_recurrence=elements * per_recurrence, elementwise=elementwise)
    parts['total'] = sum(parts.values())
    return parts


def stem_flops(tokens, in_channels, embed_dims, patch_size, batch=1):
    """Patch embedding (a stride-p conv: matmul + bias), the position add and the final hidden + residual."""
    bl = batch * tokens
    patch_embed = 2 * bl * in_channels * patch_size * patch_size * embed_dims
    return dict(patch_embed=patch_embed, elementwise=bl * embed_dims * 3,
                total=patch_embed + bl * embed_dims * 3)


def mixer_shapes(mixer):
    """The shapes mixer_flops needs, read from a built BiMambaMixer's modules."""
    return dict(d_model=mixer.in_proj.in_features, d_inner=mixer.d_inner, d_state=mixer.d_state,
                dt_rank=mixer.dt_rank, d_conv=mixer.conv1d.kernel_size[0])


def backbone_flops(backbone, height, width, batch=1, rule=None):
    """Per-layer and total forward FLOPs of a built VimBackbone on a (batch, 3, height, width) input.

    ``rule``: count the scan for this rule instead of the backbone's own.
    """
    p = backbone.patch_size
    tokens = (height // p) * (width // p)
    disc = get_discretizer(rule) if rule is not None else backbone.discretizer
    coef = coeff_flops(disc)
    proj = backbone.patch_embed.proj
    stem = stem_flops(tokens, proj.in_channels, proj.out_channels, p, batch)
    layers = [mixer_flops(tokens, **mixer_shapes(layer.mixer), coef=coef, history=disc.history, batch=batch)
              for layer in backbone.layers]
    total = stem['total'] + sum(layer['total'] for layer in layers)
    return dict(rule=disc.name, tokens=tokens, batch=batch, stem=stem, layers=layers, total=total)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def build_backbone(cfg):
    """The config's backbone, built on CPU without loading any checkpoint."""
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    import projects.vim_disc  # noqa: F401
    from mmdet.registry import MODELS
    backbone_cfg = cfg.model.backbone.copy()
    backbone_cfg.pop('init_cfg', None)
    return MODELS.build(backbone_cfg)


def _g(x):
    return f'{x / 1e9:.3f}'


def format_report(report, rule_totals, params):
    cols = ['projections', 'conv1d', 'scan_coef', 'scan_input', 'scan_recurrence', 'elementwise', 'total']
    head = '| layer | ' + ' | '.join(c for c in cols) + ' |'
    lines = [f'Backbone forward GFLOPs, rule {report["rule"]!r}, batch {report["batch"]}, {report["tokens"]} tokens',
             '', head, '| --- |' + ' ---: |' * len(cols),
             f'| stem (patch_embed + adds) | {_g(report["stem"]["patch_embed"])} | - | - | - | - | '
             f'{_g(report["stem"]["elementwise"])} | {_g(report["stem"]["total"])} |']
    # consecutive identical layers (every layer of a plain Vim) share one row
    start = 0
    layers = report['layers']
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            name = str(start) if i - 1 == start else f'{start}-{i - 1} (each)'
            lines.append(f'| {name} | ' + ' | '.join(_g(layers[start][c]) for c in cols) + ' |')
            start = i
    sums = {c: sum(layer[c] for layer in report['layers']) for c in cols}
    lines.append('| all layers | ' + ' | '.join(_g(sums[c]) for c in cols) + ' |')
    lines.append(f'| **backbone** | | | | | | | **{_g(report["total"])}** |')
    lines += ['', 'The same backbone with each rule (scan = coefficients + input term + recurrence):', '',
              '| rule | K | coef FLOPs / element | scan GFLOPs | backbone GFLOPs | scan share |',
              '| --- | ---: | ---: | ---: | ---: | ---: |']
    for name, r in rule_totals.items():
        lines.append(f'| {name} | {r["history"]} | {r["coeff_flops"]} | {_g(r["scan"])} | {_g(r["total"])} | '
                     f'{100 * r["scan"] / r["total"]:.1f} % |')
    lines += ['', f'Parameters: {params["backbone"] / 1e6:.3f} M in the backbone '
                  f'({params["per_layer"] / 1e6:.3f} M per layer, {params["pos_embed"] / 1e6:.3f} M position '
                  f'embedding at the {params["pos_grid"][0]}x{params["pos_grid"][1]} grid)']
    return '\n'.join(lines)


def analyse(backbone, height, width, batch=1):
    """(report for the backbone's rule, {rule: totals} for every registered rule, parameter counts)."""
    report = backbone_flops(backbone, height, width, batch)
    rule_totals = {}
    for name in RULES:
        r = backbone_flops(backbone, height, width, batch, rule=name)
        scan = sum(layer['scan_coef'] + layer['scan_input'] + layer['scan_recurrence'] for layer in r['layers'])
        rule_totals[name] = dict(history=RULES[name].history, coeff_flops=coeff_flops(name), scan=scan,
                                 total=r['total'])
    params = dict(backbone=count_parameters(backbone), per_layer=count_parameters(backbone.layers[0]),
                  pos_embed=backbone.pos_embed.numel(), pos_grid=list(backbone.pos_grid))
    return report, rule_totals, params


def parse_args():
    parser = argparse.ArgumentParser(description='Parameters and analytic forward FLOPs of a Vim backbone')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--shape', type=int, nargs='+', default=[1024, 1024], help='input height [width]')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--json', help='also write the numbers to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value (xxx=yyy format)')
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    height, width = (args.shape * 2)[:2] if len(args.shape) == 1 else args.shape[:2]
    backbone = build_backbone(cfg)
    p = backbone.patch_size
    if height % p or width % p:
        raise SystemExit(f'--shape {height} {width} is not a multiple of the patch size {p}')
    report, rule_totals, params = analyse(backbone, height, width, args.batch)
    print(format_report(report, rule_totals, params))
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(config=args.config, shape=[height, width], report=report, rules=rule_totals,
                           params=params, coeff_flops={k: coeff_flops(k) for k in RULES}), f, indent=1)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()

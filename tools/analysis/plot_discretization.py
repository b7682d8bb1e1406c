"""Plot what each discretization rule does to one SSM state, against z = delta * a on a log axis.

``python tools/analysis/plot_discretization.py [--configs configs/vim_*.py] [--out docs/images/discretization.png]``

Panels, sharing the z axis (z from -1e3 to -1e-4, drawn as |z| on a log scale):
  1. |Abar(z)|, the per-step decay of the state; |Abar| <= 1 is stability.
  2. the input gain sum_j w_j(z), the weight the rule gives the input over one step (in units of delta * B u);
     dotted where it is negative.
  3. w_0 / sum_j w_j, the share on the newest sample v_t: the only panel where foh, poly and highorder differ
     (they share Abar = e^z and sum_j w_j = phi_1 with exact zoh).
  4. each rule's z range at initialisation, from its config: dt in [dt_min, dt_max] (ssm_cfg) times |A| in
     1..d_state (S4D-real init A = -(1..N)), i.e. z in [-dt_max * N, -dt_min].
Stability bounds (``Discretizer.z_stable``) are vertical lines through every panel. The curves are the rules'
unclamped torch definitions from ``kernels.discretization`` in float64; a rule's clamp is noted in the legend.
"""
import argparse
import glob
import math
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from kernels.discretization import RULES, get_discretizer  # noqa: E402

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
Z_MIN, Z_MAX = -1e3, -1e-4
# One colour and dash pattern per rule, shared by the analysis tools. Dashes differ so that rules whose curves
# coincide (zoh, foh, poly and highorder all have Abar = e^z) stay visible on top of each other.
RULE_COLORS = dict(zoh='#1f77b4', foh='#ff7f0e', bilinear='#2ca02c', poly='#d62728', highorder='#9467bd',
                   rk4='#8c564b')
RULE_DASHES = dict(zoh=(None, 3.2), foh=((0, (6, 2)), 2.6), bilinear=(None, 2.2), poly=((0, (3, 2)), 2.2),
                   highorder=((0, (1, 1.5)), 2.2), rk4=(None, 1.8))


def rule_color(rule, index=0):
    return RULE_COLORS.get(rule, plt.get_cmap('tab10')(index % 10))


def z_grid(z_min=Z_MIN, z_max=Z_MAX, num=801):
    """float64 z from z_min to z_max (both < 0), log-spaced in |z|."""
    return -torch.logspace(math.log10(-z_min), math.log10(-z_max), num, dtype=torch.float64)


def rule_curves(z, rules=None):
    """For each rule: |Abar(z)|, the input gain sum_j w_j(z) and the newest-sample share w_0 / sum_j w_j.

    Everything comes from the rule's own ``abar`` / ``input_weights`` (kernels/discretization.py), unclamped.
    """
    curves = {}
    for name in rules or RULES:
        disc = get_discretizer(name)
        with torch.no_grad():
            abar = disc.abar(z).double()
            weights = [w.double().expand_as(z) for w in disc.input_weights(z)]
        gain = torch.stack(weights).sum(0)
        curves[name] = dict(z=z.numpy(), abar_abs=abar.abs().numpy(), gain=gain.numpy(),
                            newest_share=(weights[0] / gain).numpy(), history=disc.history,
                            z_stable=disc.z_stable, z_clamp=disc.z_clamp)
    return curves


def init_z_range(ssm_cfg):
    """(z_lo, z_hi, dt_min, dt_max, d_state) at init: z in [-dt_max * d_state, -dt_min * 1].

    Missing keys take VimBackbone's defaults (Mamba's: dt_min=0.001, dt_max=0.1, d_state=16).
    """
    from projects.vim_disc.models.vim import DEFAULT_SSM_CFG
    cfg = {**DEFAULT_SSM_CFG, **(ssm_cfg or {})}
    dt_min, dt_max, n = float(cfg['dt_min']), float(cfg['dt_max']), int(cfg['d_state'])
    # dt_init_floor clamps the sampled dt from below (mamba-ssm), so it can raise the smallest step
    dt_lo = max(dt_min, float(cfg['dt_init_floor']))
    return -dt_max * n, -dt_lo * 1.0, dt_min, dt_max, n


def config_init_ranges(config_paths):
    """{rule: dict(z_lo, z_hi, dt_min, dt_max, d_state, config)} from each config's model.backbone."""
    from mmengine.config import Config
    from projects.vim_disc.models.discretizers import build_discretizer
    ranges = {}
    for path in config_paths:
        cfg = Config.fromfile(path, import_custom_modules=False)
        backbone = cfg.model.backbone
        rule = build_discretizer(backbone.get('discretization', 'zoh')).name
        z_lo, z_hi, dt_min, dt_max, n = init_z_range(backbone.get('ssm_cfg'))
        if rule in ranges:
            raise ValueError(f'two configs set rule {rule!r}: {ranges[rule]["config"]} and {path}')
        ranges[rule] = dict(z_lo=z_lo, z_hi=z_hi, dt_min=dt_min, dt_max=dt_max, d_state=n, config=path)
    return ranges


def _neg_log_axis(ax):
    """x is |z| on a log scale, drawn right to left so it reads as z from -1e3 to -1e-4."""
    ax.set_xscale('log')
    ax.set_xlim(-Z_MIN, -Z_MAX)  # left = |z| 1e3: increasing z to the right
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'$-10^{{{int(round(math.log10(v)))}}}$'))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which='major', alpha=0.3)


def plot_discretization(curves, init_ranges=None, out=None, dpi=110):
    """Draw the four panels; returns (figure, drawn) where drawn maps panel -> {label: (x, y)} of every curve.

    ``init_ranges``: {rule: dict(z_lo, z_hi, dt_min, dt_max, d_state)} (see ``config_init_ranges``).
    """
    init_ranges = init_ranges or {}
    fig, axes = plt.subplots(4, 1, figsize=(10, 12.5), sharex=True,
                             gridspec_kw=dict(height_ratios=[3, 3, 2.2, 0.35 * max(len(init_ranges), 1) + 0.4]))
    ax_abar, ax_gain, ax_share, ax_init = axes
    drawn = dict(abar={}, gain={}, newest_share={}, init_ranges={}, bounds={})
    for i, (name, c) in enumerate(curves.items()):
        x = -c['z']
        color = rule_color(name, i)
        dash, width = RULE_DASHES.get(name, (None, 2.0))
        style = dict(color=color, lw=width, linestyle=dash or '-')
        label = f'{name} (K={c["history"]})'
        if c['z_clamp'] is not None:
            label += f', clamped to z >= {c["z_clamp"]:.3f}'
        ax_abar.plot(x, c['abar_abs'], label=label, **style)
        drawn['abar'][name] = (c['z'], c['abar_abs'])
        gain = c['gain']
        positive = np.where(gain > 0, gain, np.nan)
        negative = np.where(gain < 0, -gain, np.nan)
        ax_gain.plot(x, positive, label=name, **style)
        drawn['gain'][name] = (c['z'], gain)
        if np.isfinite(negative).any():
            ax_gain.plot(x, negative, label=f'{name} (negative)', **dict(style, linestyle=':'))
        ax_share.plot(x, c['newest_share'], label=name, **style)
        drawn['newest_share'][name] = (c['z'], c['newest_share'])
        if c['z_stable'] is not None:
            for ax in axes:
                ax.axvline(-c['z_stable'], color=color, lw=1.2, linestyle='-.', alpha=0.9)
            drawn['bounds'][name] = c['z_stable']
            ax_abar.annotate(f'{name} stability bound\nz = {c["z_stable"]:.3f}', xy=(-c['z_stable'], 1.0),
                             xytext=(-c['z_stable'] * 6, 3e3), color=color, fontsize=9,
                             arrowprops=dict(arrowstyle='->', color=color))

    ax_abar.axhline(1.0, color='k', lw=0.8, alpha=0.6)
    ax_abar.set_yscale('log')
    ax_abar.set_ylim(1e-6, 1e6)
    ax_abar.set_ylabel('|Abar(z)|')
    ax_abar.set_title('Per-step state decay |Abar(z)|  (stable where <= 1; zoh, foh, poly, highorder: e^z)')
    ax_abar.legend(loc='lower left', fontsize=9, ncol=2)

    ax_gain.set_yscale('log')
    ax_gain.set_ylim(1e-4, 1e4)
    ax_gain.set_ylabel('|sum_j w_j(z)|')
    ax_gain.set_title('Input gain sum_j w_j(z) per unit delta*B*u  (dotted: negative; foh, poly, highorder: '
                      'phi_1 = (e^z - 1)/z)')
    ax_gain.legend(loc='lower left', fontsize=9, ncol=3)

    ax_share.axhline(1.0, color='k', lw=0.6, alpha=0.4)
    ax_share.set_ylim(-0.3, 1.3)
    ax_share.set_ylabel('w_0 / sum_j w_j')
    ax_share.set_title('Share of the input weight on the newest sample v_t (history K > 0 spreads it)')
    ax_share.legend(loc='lower left', fontsize=9, ncol=3)

    ranges = list(init_ranges.items())
    for row, (name, r) in enumerate(ranges):
        color = rule_color(name, list(curves).index(name) if name in curves else row)
        lo, hi = (row + 0.12) / len(ranges), (row + 0.88) / len(ranges)
        ax_init.axvspan(-r['z_hi'], -r['z_lo'], ymin=lo, ymax=hi, color=color, alpha=0.55, lw=0)
        ax_init.text(-r['z_lo'] * 1.6, row + 0.5,
                     f'{name}: dt {r["dt_min"]:g}..{r["dt_max"]:g}, |A| 1..{r["d_state"]}', va='center', ha='right',
                     fontsize=8.5)
        drawn['init_ranges'][name] = (r['z_lo'], r['z_hi'])
    ax_init.set_ylim(0, max(len(ranges), 1))
    ax_init.set_yticks([])
    ax_init.set_ylabel('init z')
    if ranges:
        ax_init.set_title('z = delta * a at initialisation, per rule config (dt_min * 1 .. dt_max * d_state)',
                          fontsize=10)
    else:
        ax_init.text(0.5, 0.5, 'no configs given', transform=ax_init.transAxes, ha='center', va='center')
    for ax in axes:
        _neg_log_axis(ax)
    ax_init.set_xlabel('z = delta * a  (log scale in |z|)')
    fig.tight_layout()
    if out:
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=dpi)
    return fig, drawn


def default_configs():
    return [p for name in RULES for p in glob.glob(osp.join(REPO_ROOT, 'configs', f'vim_{name}.py'))]


def parse_args():
    parser = argparse.ArgumentParser(description='Plot |Abar|, input gain and init z ranges of every rule')
    parser.add_argument('--configs', nargs='*', default=None,
                        help='per-rule configs whose ssm_cfg sets the init ranges (default: configs/vim_<rule>.py)')
    parser.add_argument('--out', default='docs/images/discretization.png', help='PNG to write')
    parser.add_argument('--dpi', type=int, default=110)
    return parser.parse_args()


def main():
    args = parse_args()
    configs = default_configs() if args.configs is None else args.configs
    curves = rule_curves(z_grid())
    ranges = config_init_ranges(configs)
    plot_discretization(curves, ranges, out=args.out, dpi=args.dpi)
    for name, r in ranges.items():
        print(f'{name:10s} init z in [{r["z_lo"]:.4g}, {r["z_hi"]:.4g}]  ({osp.relpath(r["config"])})')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

"""Compare training runs (e.g. the six discretization rules) on shared axes, from mmengine's vis_data scalars.

``python tools/analysis/compare_runs.py WORK_DIR [WORK_DIR ...] [--labels ...] [--out compare_runs.png]
[--table compare_runs.md] [--smooth N]``

Each WORK_DIR holds timestamped launch folders (``WORK_DIR/<YYYYmmdd_HHMMSS>/vis_data/scalars.json``, one JSON
object per line). Stock mmengine opens a new folder at every launch, resumed or not; the project's
``ResumableRunner`` (the configs' default) appends a resumed launch to the first launch's folder. Either way the
lines are read in time order (folders by name, then line by line), and a training line at or before the previous
training line's iteration (a resume from an earlier checkpoint, a rollback, a fresh start in the same WORK_DIR)
replaces everything logged from its iteration on: what the run logged last for an iteration wins. Validation lines
are drawn at the iteration they followed: with LoggerHook's default ``log_metric_by_epoch=True`` an
iteration-based run stamps them step 0.

Draws one panel per loss term (``loss``, ``loss_rpn_cls``, ``s0.loss_mask``, ...), the gradient norm, the
cumulative count of skipped updates and COCO bbox / segm mAP, every run in its own colour. Writes the PNG and
a markdown table of final metrics (also printed).

Skipped updates: the guarded optimizer wrappers' running count ``nonfinite_skipped_steps`` (updates skipped for a
non-finite loss or gradient; fp16 overflows that GradScaler handled are counted apart, as
``amp_overflow_skipped_steps``, and not drawn), or for other trainers the first scalar whose name contains
``skipped``. Only running counts are read: mmengine's LogProcessor window-averages just the keys matching
``loss|time|data_time|grad_norm`` and logs any other key as its value at the logged iteration, so a per-step
skip flag in scalars.json is one sample per logging interval, from which no count can be recovered. Runs
without a count show no curve and ``-``.
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# keys that index a line rather than measure anything
INDEX_KEYS = ('step', 'iter', 'epoch')
METRICS = ('coco/bbox_mAP', 'coco/segm_mAP')
# GuardedOptimWrapper's running count of skipped updates (projects/vim_disc/engine/optim_wrapper.py)
GUARD_COUNTER = 'nonfinite_skipped_steps'


# ----------------------------------------------------------------------------------------------------
# Reading and joining the segments of one run
# ----------------------------------------------------------------------------------------------------
def find_segments(work_dir):
    """scalars.json files of a run in time order (timestamp folder names sort chronologically).

    Also accepts one launch folder (``.../<timestamp>``) or a scalars.json path.
    """
    if osp.isfile(work_dir):
        return [work_dir]
    own = osp.join(work_dir, 'vis_data', 'scalars.json')
    if osp.isfile(own):
        return [own]
    return sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')),
                  key=lambda p: osp.basename(osp.dirname(osp.dirname(p))))


def _json_or_none(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_scalars(path):
    """The JSON lines of one scalars.json; a line cut short by a killed process is skipped with a warning.

    A launch resumed into the same folder appends its first row right after the cut one, on the same line;
    rows are flat objects, so that row starts at the line's last ``{`` and is kept.
    """
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = _json_or_none(line)
            if row is None:
                start = line.rfind('{')
                row = _json_or_none(line[start:]) if start > 0 else None
                warnings.warn(f'{path}:{n}: not valid JSON (a partly written line?), '
                              + ('kept the row appended to it' if isinstance(row, dict) else 'skipped'))
            if isinstance(row, dict) and 'step' in row:
                rows.append(row)
    return rows


def join_segments(segments):
    """{key: (steps, values)} from the rows of each segment, oldest first.

    A training line (a row with ``iter``) at or before the previous training line's step, in its own segment
    or an earlier one, supersedes every point logged so far at or after its step (the iterations a resume or
    a rollback re-ran); points at the same step are replaced. Segments without training lines (e.g. an
    evaluation-only launch) only replace points at the steps they log. Other lines (validation) whose step
    is behind the segment's last training line (an epoch number) are placed at that training line's step.
    """
    points = {}
    previous_train = None
    for rows in segments:
        last_train = None
        for row in rows:
            step = int(row['step'])
            if 'iter' in row:
                if previous_train is not None and step <= previous_train:
                    for series in points.values():
                        for old in [s for s in series if s >= step]:
                            del series[old]
                previous_train = last_train = step
            elif last_train is not None and step < last_train:
                # LoggerHook's default log_metric_by_epoch=True stamps validation lines with the epoch (0 for
                # an iteration-based loop): place them at the iteration of the training line before them
                step = last_train
            for key, value in row.items():
                if key in INDEX_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                points.setdefault(key, {})[step] = float(value)
    joined = {}
    for key, series in points.items():
        if series:
            steps = np.array(sorted(series), dtype=np.int64)
            joined[key] = (steps, np.array([series[s] for s in steps], dtype=np.float64))
    return joined


def load_run(work_dir):
    """{key: (steps, values)} of a run across all its launches; raises if it has no scalars at all."""
    paths = find_segments(work_dir)
    if not paths:
        raise FileNotFoundError(f'no */vis_data/scalars.json under {work_dir}')
    return join_segments([read_scalars(p) for p in paths])


# ----------------------------------------------------------------------------------------------------
# What is drawn
# ----------------------------------------------------------------------------------------------------
def is_loss_key(key):
    # 'loss', 'loss_rpn_cls', 's0.loss_mask'; not 's0.acc', the AMP 'loss_scale', nor anything under 'ssm/'
    return '/' not in key and key != 'loss_scale' and (key.startswith('loss') or '.loss' in key)


def loss_keys(runs):
    """Loss terms logged by any run: the total first, then RPN, then the cascade stages in order."""
    keys = {k for run in runs.values() for k in run if is_loss_key(k)}
    return sorted(keys, key=lambda k: (k != 'loss', not k.startswith('loss'), k))


def skipped_steps(run):
    """(steps, cumulative skipped updates) of a run, or None when it logs no running count (see module doc)."""
    if GUARD_COUNTER in run:
        return run[GUARD_COUNTER]
    counters = sorted(k for k in run if 'skipped' in k.lower())
    return run[counters[0]] if counters else None


def smooth(values, window):
    """Trailing moving average over `window` logged points (1: unchanged)."""
    if window <= 1 or len(values) < 2:
        return values
    kernel = np.ones(min(window, len(values)))
    num = np.convolve(values, kernel)[:len(values)]
    den = np.convolve(np.ones_like(values), kernel)[:len(values)]
    return num / den


def final_metrics(run):
    """The row of the markdown table for one run."""
    def last(key):
        return float(run[key][1][-1]) if key in run else None

    train_steps = [run[k][0][-1] for k in ('loss', 'grad_norm', 'lr') if k in run]
    skipped = skipped_steps(run)
    best = None
    if 'coco/bbox_mAP' in run:
        steps, values = run['coco/bbox_mAP']
        i = int(np.argmax(values))
        best = (float(values[i]), int(steps[i]))
    return dict(iters=int(max(train_steps)) if train_steps else None, loss=last('loss'),
                grad_norm=last('grad_norm'),
                skipped=float(skipped[1][-1]) if skipped is not None else None,
                bbox_mAP=last('coco/bbox_mAP'), segm_mAP=last('coco/segm_mAP'), best_bbox_mAP=best)


def markdown_table(runs):
    header = ('| run | iterations | loss | grad norm | skipped updates | bbox mAP | segm mAP | best bbox mAP (iter) |\n'
              '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    lines = [header]

    def fmt(v, spec):
        return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for label, run in runs.items():
        m = final_metrics(run)
        best = '-' if m['best_bbox_mAP'] is None else f'{m["best_bbox_mAP"][0]:.3f} ({m["best_bbox_mAP"][1]})'
        skipped = '-' if m['skipped'] is None else f'{m["skipped"]:.0f}'
        lines.append(f'| {label} | {fmt(m["iters"], "d")} | {fmt(m["loss"], ".4f")} | {fmt(m["grad_norm"], ".3g")} '
                     f'| {skipped} | {fmt(m["bbox_mAP"], ".3f")} | {fmt(m["segm_mAP"], ".3f")} | {best} |')
    return '\n'.join(lines) + '\n'


def plot_runs(runs, out=None, smooth_window=1, ncols=4, dpi=100):
    """Draw every panel; returns (figure, drawn) with drawn = {panel title: {run label: (steps, values)}}."""
    panels = [(k, k) for k in loss_keys(runs)]
    panels += [('grad_norm', 'grad_norm'), ('skipped updates (cumulative)', None)]
    panels += [(m, m) for m in METRICS]
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows + 0.8), sharex=True, squeeze=False)
    colors = plt.get_cmap('tab10')
    drawn = {}
    for ax, (title, key) in zip(axes.flat, panels):
        drawn[title] = {}
        for i, (label, run) in enumerate(runs.items()):
            if key is None:
                series = skipped_steps(run)
            else:
                series = run.get(key)
            if series is None:
                continue
            steps, values = series
            if key is not None and key not in METRICS:
                values = smooth(values, smooth_window)
            marker = 'o' if key in METRICS else None
            ax.plot(steps, values, color=colors(i % 10), lw=1.4, marker=marker, ms=4, label=label)
            drawn[title][label] = (steps, values)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if key == 'grad_norm' and drawn[title] and all((v > 0).all() for _, v in drawn[title].values()):
            ax.set_yscale('log')
        if not drawn[title]:
            ax.text(0.5, 0.5, 'not logged by any run', transform=ax.transAxes, ha='center', va='center',
                    color='0.4')
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel('iteration')
        ax.xaxis.set_tick_params(labelbottom=True)
    handles = [plt.Line2D([], [], color=colors(i % 10), lw=2, label=label) for i, label in enumerate(runs)]
    fig.legend(handles=handles, loc='upper center', ncol=min(len(runs), 6), frameon=False, fontsize=10)
    note = f'; losses: trailing mean of {smooth_window} logged points' if smooth_window > 1 else ''
    fig.suptitle(f'{len(runs)} run(s){note}', y=0.995, fontsize=9, color='0.3', x=0.99, ha='right')
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    if out:
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=dpi)
    return fig, drawn


def parse_args():
    parser = argparse.ArgumentParser(description='Plot loss terms, grad norm, skipped updates and mAP of runs')
    parser.add_argument('work_dirs', nargs='+', help='run directories (each holding <timestamp>/vis_data/)')
    parser.add_argument('--labels', nargs='+', help='one label per run (default: the directory names)')
    parser.add_argument('--out', default='compare_runs.png', help='PNG to write')
    parser.add_argument('--table', help='markdown table to write (default: the PNG path with .md)')
    parser.add_argument('--smooth', type=int, default=1, help='trailing mean over this many logged points')
    parser.add_argument('--ncols', type=int, default=4)
    parser.add_argument('--dpi', type=int, default=100)
    return parser.parse_args()


def main():
    args = parse_args()
    labels = args.labels or [osp.basename(osp.normpath(d)) for d in args.work_dirs]
    if len(labels) != len(args.work_dirs) or len(set(labels)) != len(labels):
        raise SystemExit(f'need one distinct label per work dir, got {labels}')
    runs = {label: load_run(d) for label, d in zip(labels, args.work_dirs)}
    plot_runs(runs, out=args.out, smooth_window=args.smooth, ncols=args.ncols, dpi=args.dpi)
    table = markdown_table(runs)
    table_path = args.table or osp.splitext(args.out)[0] + '.md'
    with open(table_path, 'w') as f:
        f.write(table)
    print(table)
    print(f'wrote {args.out} and {table_path}')


if __name__ == '__main__':
    main()

"""The six rules on one GPU (issue 13): what ``six_rules_gpu.py`` computes, apart from its command line.

* the config of one run: ``configs/shapes1024/vim_<rule>.py`` + ``--cfg-options``, its schedule stretched to
  ``--iters``, its lr times 4 in a stress run, and on a CPU the plain (non-AMP) guarded wrapper;
* what a finished (or stopped) Runner knows that its logs do not say exactly: non-finite losses counted at every
  iteration, the guard's skips and AMP overflows, rollbacks, whether the weights are finite;
* the record of one rule: those facts + the curves and final values read from ``vis_data/scalars.json`` with
  ``compare_runs.load_run``;
* the report (one JSON, curves included, so that reports of several device calls merge without the work dirs)
  and its picture (``compare_runs.plot_runs``'s panels + the SSM statistics, one block of panels per mode).
"""
import copy
import io
import json
import math
import os
import os.path as osp
import re
import sys

import numpy as np

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import compare_runs  # noqa: E402  (selects matplotlib's Agg backend)
import matplotlib.pyplot as plt  # noqa: E402

RULES = ('zoh', 'foh', 'bilinear', 'poly', 'highorder', 'rk4')
CONFIG = 'configs/shapes1024/vim_{}.py'
STRESS_LR_FACTOR = 4.0
MODES = {'nominal': 1.0, 'stress': STRESS_LR_FACTOR}
SUMMARY = 'six_rules_summary.json'  # what the child process leaves in a rule's work dir
MASK_KEYS = ('s0.loss_mask', 's1.loss_mask', 's2.loss_mask')
# curves kept in the report: what compare_runs.plot_runs draws from them (loss terms, grad norm, the guard's running
# count, the metrics) and the SSM statistics (max over layers and directions, at each statistics iteration)
CURVE_KEYS = ('loss', ) + MASK_KEYS + ('grad_norm', compare_runs.GUARD_COUNTER) + compare_runs.METRICS
SSM_CURVES = {'ssm_abar_max': ('abar_max', max), 'ssm_delta_p99': ('delta_p99', max),
              'ssm_z_beyond': ('z_beyond', max)}
LN2 = math.log(2.0)  # a mask head that has learnt nothing sits here (binary cross-entropy at p = 0.5)


# ----------------------------------------------------------------------------------------------------
# The config of one run
# ----------------------------------------------------------------------------------------------------
def rescale_schedule(cfg, iters: int) -> None:
    """Stretch an iteration-based schedule to ``iters`` in place: every ``end`` and milestone of the parameter
    schedulers, the validation interval and the checkpoint interval keep their fraction of the run."""
    old = int(cfg.train_cfg.max_iters)
    iters = int(iters)
    if iters < 1:
        raise ValueError(f'iters must be >= 1, got {iters}')

    def scale(n):
        return max(1, min(iters, round(n * iters / old)))

    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = scale(cfg.train_cfg.get('val_interval', old))
    for scheduler in cfg.get('param_scheduler') or []:
        if scheduler.get('by_epoch', True):
            raise ValueError(f'cannot rescale an epoch-based scheduler: {scheduler}')
        if 'end' in scheduler:
            scheduler['end'] = scale(scheduler['end'])
        if 'milestones' in scheduler:
            scheduler['milestones'] = [scale(m) for m in scheduler['milestones']]
    ckpt = cfg.get('default_hooks', {}).get('checkpoint')
    if ckpt and ckpt.get('interval', -1) > 0:
        ckpt['interval'] = scale(ckpt['interval'])


def adapt_to_device(cfg, device: str) -> list:
    """What a run on ``device`` needs that the GPU config does not say; returns the changes, in words.

    On a CPU, mmengine's AMP wrapper refuses to build: the plain ``GuardedOptimWrapper`` has the same guard,
    parameter groups and clipping. TensorBoard is dropped where it is not installed (the report reads
    ``scalars.json``, which ``LocalVisBackend`` writes).
    """
    notes = []
    if device == 'cpu':
        wrapper = cfg.optim_wrapper
        if wrapper.get('type') == 'GuardedAmpOptimWrapper':
            for key in ('dtype', 'loss_scale', 'min_loss_scale'):
                wrapper.pop(key, None)
            wrapper.type = 'GuardedOptimWrapper'
            notes.append('optim_wrapper: GuardedOptimWrapper (no AMP on a CPU)')
        cfg.model.backbone.cuda_graph = False
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        backends = cfg.get('visualizer', {}).get('vis_backends') or []
        kept = [b for b in backends if b.get('type') != 'TensorboardVisBackend']
        if len(kept) != len(backends):
            cfg.visualizer.vis_backends = kept
            notes.append('visualizer: TensorboardVisBackend dropped (tensorboard not installed)')
    return notes


def prepare_config(rule: str, work_dir: str, iters=None, lr_factor: float = 1.0, cfg_options=None,
                   device: str = 'cuda'):
    """The Config of one run: the rule's shapes1024 config, stretched to ``iters``, then ``cfg_options``, then the lr
    times ``lr_factor`` (a stress run multiplies whatever lr the options set), then the device's needs."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, CONFIG.format(rule)))
    if iters:
        rescale_schedule(cfg, iters)
    if cfg_options:  # after the rescale: what the command line sets explicitly stays as set
        cfg.merge_from_dict(cfg_options)
    cfg.optim_wrapper.optimizer.lr = cfg.optim_wrapper.optimizer.lr * lr_factor
    notes = adapt_to_device(cfg, device)
    cfg.work_dir = work_dir
    cfg.launcher = 'none'
    return cfg, notes


def config_facts(cfg) -> dict:
    """The numbers of a run's config that the report states next to the results."""
    crop = [t for t in cfg.train_dataloader.dataset.pipeline if t['type'] == 'PolygonRandomCrop']
    return dict(
        lr=float(cfg.optim_wrapper.optimizer.lr), batch_size=int(cfg.train_dataloader.batch_size),
        image_size=list(crop[0]['crop_size']) if crop else None, depth=int(cfg.model.backbone.arch.depth),
        iters_planned=int(cfg.train_cfg.max_iters), precision=cfg.optim_wrapper.get('dtype', 'float32'),
        stage_loss_weights=[float(w) for w in cfg.model.roi_head.stage_loss_weights],
        clip_grad=dict(cfg.optim_wrapper.get('clip_grad') or {}),
        ssm_cfg=dict(cfg.model.backbone.ssm_cfg), discretization=cfg.model.backbone.discretization)


# ----------------------------------------------------------------------------------------------------
# What the Runner knows at the end
# ----------------------------------------------------------------------------------------------------
SKIP_LINE = re.compile(r'iter (\d+): (.*?) update skipped on every rank')
ROLLBACK_LINE = re.compile(r'rollback (\d+)/(\d+): .*? ending at iter (\d+); restored .*? \(iter (\d+)\); '
                           r'learning rate x([0-9.eE+-]+)')


def guard_events(log_text: str) -> dict:
    """Skipped updates and rollbacks as the guard and NonFiniteRollbackHook log them (with iteration and cause)."""
    skips = []
    for it, what in SKIP_LINE.findall(log_text):
        cause = [c for c, word in (('loss', 'loss on rank'), ('gradient', 'gradient norm'),
                                   ('loss scale', 'loss scale below')) if word in what]
        skips.append(dict(iter=int(it), cause=' and '.join(cause) or what.strip()))
    rollbacks = [dict(failed_iter=int(f), restored_iter=int(r), lr_scale=float(s))
                 for _, _, f, r, s in ROLLBACK_LINE.findall(log_text)]
    return dict(skip_events=skips, rollback_events=rollbacks)


def runner_facts(runner) -> dict:
    """Counters and checks read from a Runner after ``train()`` returned or raised."""
    import torch
    from projects.vim_disc.engine.hooks import NonFiniteRollbackHook
    from projects.vim_disc.engine.optim_wrapper import AMP_OVERFLOWS_TOTAL, SKIPS_TOTAL

    hub = runner.message_hub
    facts = dict(iters_done=int(runner.iter))
    # RuntimeInfoHook puts every iteration's loss into the hub (a history of up to 10^6 values): an exact count,
    # where the logged values are window means
    losses = hub.log_scalars.get('train/loss')
    values = np.asarray(losses.data[0], dtype=np.float64) if losses is not None else np.zeros(0)
    facts.update(losses_seen=int(values.size), nonfinite_losses=int((~np.isfinite(values)).sum()))
    facts['skipped_updates'] = int(hub.get_info(SKIPS_TOTAL, 0) or 0)
    facts['amp_overflows'] = int(hub.get_info(AMP_OVERFLOWS_TOTAL, 0) or 0)
    hook = next((h for h in runner.hooks if isinstance(h, NonFiniteRollbackHook)), None)
    facts['rollbacks'] = int(hook.rollbacks) if hook is not None else None
    last_skip = getattr(runner.optim_wrapper, 'last_skip', None)
    facts['last_skip'] = json_safe(last_skip) if last_skip else None
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    facts.update(weights_finite=not bad, nonfinite_parameters=bad[:10])
    log_file = osp.join(runner.log_dir, f'{runner.timestamp}.log')
    facts['log_file'] = log_file
    if osp.isfile(log_file):
        with open(log_file, errors='replace') as f:
            facts.update(guard_events(f.read()))
    return facts


# ----------------------------------------------------------------------------------------------------
# The record of one rule
# ----------------------------------------------------------------------------------------------------
def json_safe(value):
    """JSON has no NaN / inf: non-finite numbers become null (recursively)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _curve(steps, values) -> dict:
    return dict(iter=[int(s) for s in steps], value=json_safe([float(v) for v in values]))


def ssm_series(run: dict, stat: str, reduce=max):
    """(steps, values): SSMStatsHook's ``ssm/<layer>/<dir>/<stat>`` reduced over layers and directions per step."""
    per_step = {}
    for key, (steps, values) in run.items():
        if key.startswith('ssm/') and key.endswith('/' + stat):
            for s, v in zip(steps.tolist(), values.tolist()):
                if math.isfinite(v):
                    per_step.setdefault(s, []).append(v)
    steps = sorted(per_step)
    return np.array(steps, dtype=np.int64), np.array([reduce(per_step[s]) for s in steps], dtype=np.float64)


def _last(series):
    if series is None or len(series[1]) == 0:
        return None
    return float(series[1][-1])


def rule_record(work_dir: str, summary: dict) -> dict:
    """One rule's entry of the report: the child's summary + what its scalars.json logged."""
    record = dict(summary)
    try:
        run = compare_runs.load_run(work_dir)
    except FileNotFoundError:
        run = {}
    curves = {key: run[key] for key in CURVE_KEYS if key in run}
    skipped = compare_runs.skipped_steps(run) if run else None
    if skipped is not None:
        curves[compare_runs.GUARD_COUNTER] = skipped
    for name, (stat, reduce) in SSM_CURVES.items():
        steps, values = ssm_series(run, stat, reduce)
        if len(steps):
            curves[name] = (steps, values)

    record['loss_final'] = _last(run.get('loss'))
    record['loss_mask_final'] = {k.split('.')[0]: _last(run.get(k)) for k in MASK_KEYS}
    record['grad_norm_final'] = _last(run.get('grad_norm'))
    for metric in compare_runs.METRICS:
        record[metric.split('/')[1]] = _last(run.get(metric))
    # training lines only (a validation line at the same step also logs a 'time'); each is a window mean, and the
    # first window holds compilation and CUDA-graph capture
    rows = [row for path in compare_runs.find_segments(work_dir) for row in compare_runs.read_scalars(path)]
    times = [float(row['time']) for row in rows if 'iter' in row and 'time' in row]
    steady = times[1:] if len(times) > 1 else times
    record['s_per_iter'] = float(np.median(steady)) if steady else None
    # LogProcessor logs max_memory_allocated (MiB) since its previous line; the child adds the tail after the last
    peaks = [float(row['memory']) / 1024 for row in rows if 'memory' in row]
    if record.get('peak_mem_gib_tail') is not None:
        peaks.append(record['peak_mem_gib_tail'])
    record.pop('peak_mem_gib_tail', None)
    record['peak_mem_gib'] = max(peaks) if peaks else None
    record['ssm'] = {stat: float(curves[name][1].max()) if name in curves else None
                     for name, (stat, _) in SSM_CURVES.items()}
    record['ssm']['stats_iters'] = [int(s) for s in curves['ssm_abar_max'][0]] if 'ssm_abar_max' in curves else []
    # mmdet logs each stage's loss times its stage_loss_weight (1, 0.5, 0.25): compare the unweighted value to ln 2
    weights = summary.get('stage_loss_weights') or [1.0] * len(MASK_KEYS)
    record['loss_mask_final_unweighted'] = {
        stage: (None if v is None else v / w) for (stage, v), w in zip(record['loss_mask_final'].items(), weights)}
    unweighted = list(record['loss_mask_final_unweighted'].values())
    record['loss_mask_below_ln2'] = None not in unweighted and max(unweighted) < LN2
    record['curves'] = {key: _curve(*series) for key, series in curves.items()}
    return json_safe(record)


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
def new_report(meta: dict) -> dict:
    return dict(meta, runs={})


def add_record(report: dict, mode: str, rule: str, record: dict, iters=None, lr_factor=None) -> None:
    lr_factor = MODES[mode] if lr_factor is None else lr_factor
    run = report['runs'].setdefault(mode, dict(lr_factor=lr_factor, iters=iters, rules={}))
    run['rules'][rule] = record


def write_json(data: dict, path: str) -> None:
    """Strict JSON (non-finite numbers as null), replacing ``path`` atomically: a process killed while writing
    leaves the previous file whole."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(json_safe(data), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def merge_reports(reports) -> dict:
    """Reports of several device calls (rule subsets, nominal and stress) as one: later rules of a mode win. Stress
    calls at different lr factors are different experiments: refused, not mixed in one block."""
    merged = None
    for report in reports:
        if merged is None:
            merged = copy.deepcopy(report)
            merged['merged_from'] = []
            merged['runs'] = {}
        merged['merged_from'].append({k: v for k, v in report.items() if k not in ('runs', 'merged_from')})
        for mode, run in report['runs'].items():
            into = merged['runs'].setdefault(mode, dict(run, rules={}))
            if into.get('lr_factor') != run.get('lr_factor'):
                raise ValueError(f"cannot merge {mode} runs at {into.get('lr_factor')}x and {run.get('lr_factor')}x lr")
            into['rules'].update(run['rules'])
    # modes in a fixed order, rules in the issue's order
    merged['runs'] = {m: dict(merged['runs'][m], rules={r: merged['runs'][m]['rules'][r] for r in RULES
                                                         if r in merged['runs'][m]['rules']})
                      for m in MODES if m in merged['runs']}
    return merged


# ----------------------------------------------------------------------------------------------------
# The picture
# ----------------------------------------------------------------------------------------------------
def _label(rule: str, r: dict) -> str:
    def num(v, fmt):
        return '-' if v is None else format(v, fmt)

    parts = [rule]
    if r.get('status') != 'finished':
        parts[0] += f" [{r.get('status', '?')}]"
    parts.append(f"mAP {num(r.get('bbox_mAP'), '.3f')}/{num(r.get('segm_mAP'), '.3f')}")
    parts.append(f"{num(r.get('s_per_iter'), '.2f')} s/it")
    if r.get('peak_mem_gib') is not None:
        parts.append(f"{r['peak_mem_gib']:.1f} GiB")
    parts.append(f"skipped {num(r.get('skipped_updates'), 'd')}, rollbacks {num(r.get('rollbacks'), 'd')}")
    return ', '.join(parts)


def _runs_of(mode_run: dict) -> dict:
    """{legend label: {key: (steps, values)}} as compare_runs.plot_runs takes them."""
    runs = {}
    for rule, r in mode_run['rules'].items():
        runs[_label(rule, r)] = {
            k: (np.asarray(c['iter'], dtype=np.int64),
                np.asarray([np.nan if v is None else v for v in c['value']], dtype=np.float64))
            for k, c in r.get('curves', {}).items()}
    return runs


def plot_mode(mode: str, mode_run: dict, title: str = '', dpi: int = 80):
    """compare_runs' panels for one mode (loss, each stage's loss_mask, grad norm, skipped updates, mAP) + the SSM
    statistics, drawn on the spare cells of its grid. Returns (figure, {panel title: axis})."""
    runs = _runs_of(mode_run)
    panels = len(compare_runs.loss_keys(runs)) + 2 + len(compare_runs.METRICS)
    # the narrowest grid up to 5 wide that leaves two spare cells for the SSM panels
    ncols = next(c for c in (5, 4, 3, 6) if -(-panels // c) * c - panels >= 2)
    fig, _ = compare_runs.plot_runs(runs, ncols=ncols, dpi=dpi)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    spare = [ax for ax in fig.axes if not ax.get_visible()]
    colors = plt.get_cmap('tab10')
    for ax, (key, name, ref) in zip(spare, (('ssm_abar_max', 'max |Abar| (all layers)', 1.0),
                                            ('ssm_delta_p99', 'delta p99 (max over layers)', None))):
        ax.set_visible(True)
        for i, run in enumerate(runs.values()):
            if key in run:
                ax.plot(*run[key], color=colors(i % 10), lw=1.4, marker='.', ms=5)
        if ref is not None:
            ax.axhline(ref, color='0.4', lw=0.8, ls='--')
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        axes[name] = ax
    # a mask head that has learnt nothing, as logged: ln 2 times the stage's loss weight
    weights = next((r['stage_loss_weights'] for r in mode_run['rules'].values() if r.get('stage_loss_weights')),
                   [1.0] * len(MASK_KEYS))
    for key, weight in zip(MASK_KEYS, weights):
        if key in axes:
            axes[key].axhline(LN2 * weight, color='0.4', lw=0.8, ls='--')
    lr = {r.get('lr') for r in mode_run['rules'].values()}
    lr_text = f"lr {', '.join(f'{v:.3g}' for v in sorted(x for x in lr if x is not None))}"
    fig.suptitle(f"{mode} ({mode_run.get('lr_factor', 1):g} x lr, {lr_text}) {title}", y=0.995, fontsize=9,
                 color='0.2', x=0.99, ha='right')
    return fig, axes


def plot_report(report: dict, out: str, dpi: int = 80) -> list:
    """One PNG: a block of panels per mode (nominal above stress). Returns the panel titles of each block."""
    from PIL import Image

    blocks, titles = [], []
    device = report.get('device') or ''
    for mode in [m for m in MODES if m in report['runs']]:
        fig, axes = plot_mode(mode, report['runs'][mode], title=f'- {device}', dpi=dpi)
        buf = io.BytesIO()
        fig.savefig(buf, format='png', dpi=dpi)
        plt.close(fig)
        blocks.append(Image.open(io.BytesIO(buf.getvalue())).convert('RGB'))
        titles.append(list(axes))
    if not blocks:
        raise ValueError('the report has no runs to draw')
    width = max(b.width for b in blocks)
    canvas = Image.new('RGB', (width, sum(b.height for b in blocks)), 'white')
    y = 0
    for block in blocks:
        canvas.paste(block, (0, y))
        y += block.height
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    canvas.save(out)
    return titles

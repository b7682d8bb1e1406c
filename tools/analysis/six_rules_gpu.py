"""Train the six discretization rules one after another on one GPU, each at its COCO settings on the embedded shapes
data (configs/shapes1024/vim_<rule>.py), and write ONE JSON and ONE picture (issue 13; docs/analysis.md says how to
read them).

    python tools/analysis/six_rules_gpu.py [--rules zoh foh ...] [--iters 300] [--stress [--stress-factor 4]] \
        [--work-dir work_dirs/six_rules] [--out-json J] [--out-png P] [--time-budget S] [--device cuda|cpu] \
        [--parallel N] [--keep-checkpoints] [--cfg-options key=value ...]
    python tools/analysis/six_rules_gpu.py --merge A.json B.json ... --out-json J --out-png P

``--stress`` trains at ``--stress-factor`` (default 4) x the config's lr (the guard's skips and rollbacks, on
purpose). Each rule trains in its own process (a crash or a hang costs that rule only; ``--time-budget`` stops it
with SIGTERM, which the PreemptionHook turns into a clean stop) into WORK_DIR/<nominal|stress>/<rule>,
``--parallel`` of them at a time; a rule whose work dir already holds a finished run of the same request is not
trained again. The JSON and the PNG are rewritten after every rule, so a call cut short still leaves the rules it
finished. ``--merge`` joins the JSONs of several calls (rule subsets, nominal and stress) into one JSON and one
picture, without training.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import six_rules  # noqa: E402

GRACE_S = 30  # after SIGTERM: the PreemptionHook saves and stops at the next iteration boundary
MIN_RULE_S = 60  # a rule is not started with less device time left than this
REPORT_RESERVE_S = 15  # kept back from the budget for the last report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rules', nargs='+', default=list(six_rules.RULES), choices=six_rules.RULES)
    parser.add_argument('--iters', type=int, help='training iterations per rule (default: the config\'s, 300); '
                        'the warmup, lr drops and checkpoint interval keep their fraction of the run')
    parser.add_argument('--stress', action='store_true', help='the config\'s lr times --stress-factor')
    parser.add_argument('--stress-factor', type=float, default=six_rules.STRESS_LR_FACTOR,
                        help='lr multiplier of a stress run (default %(default)g; at 4x no rule diverged on an H200, '
                        'docs/analysis.md)')
    parser.add_argument('--work-dir', default='work_dirs/six_rules')
    parser.add_argument('--out-json', help='default: WORK_DIR/six_rules_<nominal|stress>.json')
    parser.add_argument('--out-png', help='default: the JSON path with .png')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='overrides for every rule, as tools/train.py takes them')
    parser.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    parser.add_argument('--time-budget', type=float, default=0, help='seconds for the whole call (0: no limit)')
    parser.add_argument('--parallel', type=int, default=1, help='rules trained at the same time on the one GPU '
                        '(their s/iter is then measured while sharing it)')
    parser.add_argument('--keep-checkpoints', action='store_true', help='keep each rule\'s *.pth (about 0.8 GB '
                        'each at full size); by default they are deleted once the rule is recorded')
    parser.add_argument('--merge', nargs='+', metavar='JSON', help='merge these reports instead of training')
    parser.add_argument('--dpi', type=int, default=80)
    parser.add_argument('--train-one', choices=six_rules.RULES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error('--parallel must be at least 1')
    if args.stress_factor <= 0:
        parser.error('--stress-factor must be positive')
    return args


def _lr_factor(args) -> float:
    return args.stress_factor if args.stress else 1.0


# ----------------------------------------------------------------------------------------------------
# The child: one rule, one mmengine Runner
# ----------------------------------------------------------------------------------------------------
def train_one(args) -> int:
    import torch
    from mmengine.config import DictAction

    from projects.vim_disc.engine import (NonFiniteTrainingError, install_preemption_signal_handlers,
                                          install_safe_checkpoint_loading)
    from projects.vim_disc.utils import build_runner, check_data_exists

    install_preemption_signal_handlers()  # SIGTERM from the parent's time budget: save and stop, not die
    install_safe_checkpoint_loading()
    options = argparse.ArgumentParser()
    options.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    cfg_options = options.parse_args(['--cfg-options', *args.cfg_options]).cfg_options if args.cfg_options else {}
    mode = 'stress' if args.stress else 'nominal'
    cfg, notes = six_rules.prepare_config(args.train_one, args.work_dir, args.iters, _lr_factor(args),
                                          cfg_options, args.device)
    os.makedirs(args.work_dir, exist_ok=True)
    path = osp.join(args.work_dir, six_rules.SUMMARY)
    cuda = args.device == 'cuda' and torch.cuda.is_available()
    summary = dict(rule=args.train_one, mode=mode, config=six_rules.CONFIG.format(args.train_one),
                   request=_request(args), notes=notes, status='crashed', stop_reason=None,
                   device=torch.cuda.get_device_name(0) if cuda else 'cpu', **six_rules.config_facts(cfg))
    six_rules.write_json(summary, path)  # a process killed from outside still leaves what it was running
    check_data_exists(cfg)
    runner, start = None, time.perf_counter()
    try:
        runner = build_runner(cfg)
        runner.train()
        if runner.iter >= cfg.train_cfg.max_iters:
            summary['status'] = 'finished'
        else:  # the PreemptionHook stopped it: the parent's time budget ran out
            summary.update(status='out_of_time', stop_reason=f'stopped by a signal at iter {runner.iter}')
    except NonFiniteTrainingError as e:
        # the guard gave up after its rollbacks: say why, and still evaluate the (finite) weights it kept
        summary.update(status='stopped', stop_reason=str(e))
        try:
            runner.val()
        except Exception as val_error:  # noqa: BLE001 (reported, not raised: the stop is the result)
            summary['val_error'] = f'{type(val_error).__name__}: {val_error}'
    except Exception:  # noqa: BLE001 (a crash is a result of this run too)
        summary['stop_reason'] = traceback.format_exc()[-4000:]
    summary['wall_s'] = time.perf_counter() - start
    six_rules.write_json(summary, path)  # the outcome first: reading the counters may fail after a CUDA error
    try:
        if runner is not None:
            summary.update(six_rules.runner_facts(runner))
        if cuda:
            summary['peak_mem_gib_tail'] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as facts_error:  # noqa: BLE001
        summary['facts_error'] = f'{type(facts_error).__name__}: {facts_error}'
    six_rules.write_json(summary, path)
    print(f"[six_rules] {args.train_one} ({mode}): {summary['status']}", flush=True)
    return 0 if summary['status'] in ('finished', 'stopped') else 1


# ----------------------------------------------------------------------------------------------------
# The parent: every rule in a child process, then the report
# ----------------------------------------------------------------------------------------------------
def _request(args) -> dict:
    return dict(iters=args.iters, stress=bool(args.stress), lr_factor=_lr_factor(args), device=args.device,
                cfg_options=list(args.cfg_options))


def _run_child(args, rule, work_dir, timeout):
    """Train one rule in a child process; its output goes to ours, each line prefixed with the rule. Returns (exit
    code, None or what the time budget did to it)."""
    cmd = [sys.executable, osp.abspath(__file__), '--train-one', rule, '--work-dir', work_dir, '--device', args.device]
    cmd += ['--iters', str(args.iters)] if args.iters else []
    cmd += ['--stress', '--stress-factor', repr(args.stress_factor)] if args.stress else []
    cmd += ['--cfg-options', *args.cfg_options] if args.cfg_options else []
    _say(' '.join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors='replace')
    ended = []  # what the timers did
    timers = []

    def kill():
        if proc.poll() is None:
            ended.append(f'killed {GRACE_S} s after SIGTERM')
            proc.kill()

    def terminate():
        if proc.poll() is None:
            ended.append(f'out of time after {timeout:.0f} s: SIGTERM')
            proc.send_signal(signal.SIGTERM)  # PreemptionHook: checkpoint and stop at the next iteration
            timers.append(threading.Timer(GRACE_S, kill))
            timers[-1].start()

    if timeout is not None:
        timers.append(threading.Timer(max(timeout, 0), terminate))
        timers[-1].start()
    for line in proc.stdout:
        _say(line.rstrip('\n'), prefix=f'[{rule}]')
    code = proc.wait()
    for timer in list(timers):
        timer.cancel()
    return code, ', '.join(ended) or None


_print_lock = threading.Lock()


def _say(text, prefix='[six_rules]'):
    with _print_lock:
        print(prefix, text, flush=True)


def _git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _read_summary(work_dir):
    try:
        with open(osp.join(work_dir, six_rules.SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _print_line(rule, r):
    masks = ' '.join(f'{k} {v:.3f}' if v is not None else f'{k} -' for k, v in r['loss_mask_final'].items())
    _say(f"{rule}: {r['status']}, {r.get('iters_done')} it, loss_mask {masks}, non-finite losses "
         f"{r.get('nonfinite_losses')}, skipped {r.get('skipped_updates')}, rollbacks {r.get('rollbacks')}, weights "
         f"finite {r.get('weights_finite')}, mAP {r.get('bbox_mAP')}/{r.get('segm_mAP')}, {r.get('s_per_iter')} "
         f"s/it, {r.get('peak_mem_gib')} GiB" + (f' ({_headline(r)})' if r.get('stop_reason') else ''))


def _headline(record):
    """One line of a stop reason: a traceback's last line (the exception), another reason's first."""
    lines = [line for line in record['stop_reason'].strip().splitlines() if line.strip()]
    return lines[-1] if record['status'] == 'crashed' else lines[0]


def _train_rule(args, mode, rule, start):
    """The summary of one rule: reused when its work dir holds a finished run of the same request, else trained
    (or not started, when the time budget is spent)."""
    work_dir = osp.join(args.work_dir, mode, rule)
    summary = _read_summary(work_dir)
    if summary and summary.get('request') == _request(args) and summary.get('status') in ('finished', 'stopped'):
        _say(f'{rule} ({mode}): done already ({work_dir})')
        return work_dir, summary
    left = args.time_budget - (time.monotonic() - start) - REPORT_RESERVE_S if args.time_budget else None
    if left is not None and left < MIN_RULE_S:
        return work_dir, dict(rule=rule, mode=mode, config=six_rules.CONFIG.format(rule), status='not_run',
                              stop_reason=f'not started: {max(left, 0):.0f} s of the time budget left')
    shutil.rmtree(work_dir, ignore_errors=True)  # a fresh run: no segments of an older one
    code, timer_note = _run_child(args, rule, work_dir, left)
    summary = _read_summary(work_dir) or dict(rule=rule, mode=mode, config=six_rules.CONFIG.format(rule),
                                              status='crashed')
    if timer_note and summary.get('status') not in ('finished', 'stopped'):
        summary.update(status='out_of_time', stop_reason=timer_note)
    elif timer_note:
        summary.setdefault('notes', []).append(f'{timer_note} (while validating or writing)')
    elif code != 0 and summary.get('status') in ('finished', 'stopped'):
        summary.update(status='crashed', stop_reason=f'exit code {code}')
    if summary.get('status') == 'crashed' and not summary.get('stop_reason'):
        summary['stop_reason'] = f'exit code {code} without a recorded reason (see the log above)'
    if not args.keep_checkpoints and osp.isdir(work_dir):
        for name in os.listdir(work_dir):
            if name.endswith('.pth') or name == 'last_checkpoint':
                os.remove(osp.join(work_dir, name))
    return work_dir, summary


def run_all(args) -> int:
    import torch  # the version only: CUDA is initialised in the children, not here
    start = time.monotonic()
    mode = 'stress' if args.stress else 'nominal'
    out_json = args.out_json or osp.join(args.work_dir, f'six_rules_{mode}.json')
    out_png = args.out_png or osp.splitext(out_json)[0] + '.png'
    report = six_rules.new_report(dict(
        command=' '.join([osp.relpath(osp.abspath(__file__), ROOT)] + sys.argv[1:]), git_commit=_git_commit(),
        torch=torch.__version__, device=None, parallel=args.parallel, family='configs/shapes1024',
        created=time.strftime('%Y-%m-%d %H:%M:%S')))
    records = {}
    rules = list(dict.fromkeys(args.rules))  # a rule named twice would train twice into one work dir
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {pool.submit(_train_rule, args, mode, rule, start): rule for rule in rules}
        for future in as_completed(futures):
            rule = futures[future]
            work_dir, summary = future.result()
            records[rule] = six_rules.rule_record(work_dir, summary)
            report['device'] = report['device'] or summary.get('device')
            report['runs'].pop(mode, None)
            for name in [r for r in rules if r in records]:  # in the order asked for, whatever finished first
                six_rules.add_record(report, mode, name, records[name], iters=records[name].get('iters_planned'),
                                     lr_factor=_lr_factor(args))
            _print_line(rule, records[rule])
            six_rules.write_json(report, out_json)
            six_rules.plot_report(report, out_png, dpi=args.dpi)
    _say(f'wrote {out_json} and {out_png} after {time.monotonic() - start:.0f} s')
    return 1 if any(r['status'] not in ('finished', 'stopped') for r in records.values()) else 0


def merge(args) -> int:
    report = six_rules.merge_reports([six_rules.load_json(p) for p in args.merge])
    out_json = args.out_json or 'six_rules.json'
    out_png = args.out_png or osp.splitext(out_json)[0] + '.png'
    six_rules.write_json(report, out_json)
    six_rules.plot_report(report, out_png, dpi=args.dpi)
    _say(f'merged {len(args.merge)} report(s) into {out_json} and {out_png}')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.train_one:
        return train_one(args)
    if args.merge:
        return merge(args)
    return run_all(args)


if __name__ == '__main__':
    sys.exit(main())

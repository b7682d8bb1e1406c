"""Resilience benchmarks: resume-to-first-step time at a late iteration, and the SSM statistics overhead.

``python benchmarks/benchmark_resume.py [--iters 20000] [--what resume ssm-stats] [--out work_dirs/benchmark_resume.json]``

resume (one line per provider; the demo config on the embedded shapes dataset, its own pipeline and
workers):
  stock      mmengine's IterBasedTrainLoop + InfiniteSampler + mmdet's AspectRatioBatchSampler: the
             resumed loop pulls every already-trained batch through the dataloader
  resumable  ResumableIterBasedTrainLoop + ResumableInfiniteSampler + ResumableAspectRatioBatchSampler:
             the index stream is positioned arithmetically, no sample is loaded
  A real Runner resumes (resume=True) from a checkpoint of the demo model whose iteration was set to
  --iters; the clock runs from ``runner.train()`` to the first ``before_train_iter`` (checkpoint load, data
  positioning and the first batch; no forward). ``data`` is the positioning part alone. Both providers
  must deliver the same first batch (checked). ``--stock-limit`` caps the stock replay (seconds): past it,
  the replay rate measured so far is extrapolated and the line says so.

ssm-stats: one training step of the demo detector (VimBackbone, CPU), timed in CPU seconds without the
  hook, with ``SSMStatsHook`` idle (interval not reached) and with it recording; the overhead at interval
  N is ((t_record - t_plain) + (N - 1)(t_idle - t_plain)) / (N t_plain), each t the minimum of --repeats
  steps (the least disturbed one; the medians are printed and saved beside them). The hook's own work on a
  recording step (per-layer summaries + collection, again the minimum) is timed directly too.

Prints a table and writes JSON.
"""
import argparse
import json
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time

from _bootstrap import setup_repo_path

setup_repo_path()

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

import projects.vim_disc  # noqa: E402,F401  (registers the models)
import projects.vim_disc.engine.hooks  # noqa: E402,F401
import projects.vim_disc.engine.optim_wrapper  # noqa: E402,F401
import projects.vim_disc.engine.sampler  # noqa: E402,F401
from projects.vim_disc.engine.checkpoint import install_safe_checkpoint_loading  # noqa: E402

DEMO = 'configs/demo/vim_demo.py'
STOCK = dict(loop='IterBasedTrainLoop', sampler='InfiniteSampler', batch_sampler='AspectRatioBatchSampler')
RESUMABLE = dict(loop='ResumableIterBasedTrainLoop', sampler='ResumableInfiniteSampler',
                 batch_sampler='ResumableAspectRatioBatchSampler')
IMPORTS = ['projects.vim_disc', 'projects.vim_disc.engine.hooks', 'projects.vim_disc.engine.sampler',
           'projects.vim_disc.engine.optim_wrapper']


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default=DEMO)
    p.add_argument('--iters', type=int, default=20000, help='iteration the run resumes at')
    p.add_argument('--what', nargs='+', default=['resume', 'ssm-stats'], choices=['resume', 'ssm-stats'])
    p.add_argument('--stock-limit', type=float, default=1800.0,
                   help='stop the stock replay after this many seconds and extrapolate')
    p.add_argument('--interval', type=int, default=50, help='SSMStatsHook interval for the overhead')
    p.add_argument('--repeats', type=int, default=7, help='timed steps per ssm-stats variant')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads for ssm-stats (1: no OpenMP spinning in the CPU-time clock)')
    p.add_argument('--work-dir', default=None)
    p.add_argument('--out', default='work_dirs/benchmark_resume.json')
    return p.parse_args()


def base_cfg(config, work_dir):
    cfg = Config.fromfile(config)
    cfg.custom_imports = dict(imports=IMPORTS, allow_failed_imports=False)
    cfg.work_dir = work_dir
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 10 ** 9
    cfg.default_hooks.pop('visualization', None)
    cfg.visualizer = dict(type='DetLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')])
    return cfg


def set_providers(cfg, providers, max_iters):
    cfg.train_cfg = dict(type=providers['loop'], max_iters=max_iters, val_interval=10 ** 9)
    cfg.train_dataloader.sampler = dict(type=providers['sampler'], shuffle=True)
    cfg.train_dataloader.batch_sampler = dict(type=providers['batch_sampler'])


class _FirstStep(Exception):
    pass


class _StopAtFirstStep(Hook):
    """Records the time and the first batch's image ids, then ends the run."""
    priority = 'HIGHEST'

    def __init__(self, sink):
        self.sink = sink

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.sink['first_step'] = time.perf_counter()
        self.sink['batch'] = [s.img_id for s in data_batch['data_samples']]
        raise _FirstStep


def make_checkpoint(config, work_dir, iters):
    """One real demo iteration, then its checkpoint relabelled as iteration ``iters``."""
    from mmengine.runner import Runner
    cfg = base_cfg(config, work_dir)
    set_providers(cfg, RESUMABLE, 1)
    cfg.default_hooks.checkpoint.interval = 1
    Runner.from_cfg(cfg).train()
    ckpt = torch.load(osp.join(work_dir, 'iter_1.pth'), weights_only=True)
    ckpt['meta']['iter'] = iters
    ckpt['message_hub']['runtime_info']['iter'] = iters
    path = osp.join(work_dir, f'iter_{iters}.pth')
    torch.save(ckpt, path)
    return path


def time_resume(config, providers, ckpt, iters, work_dir, stock_limit):
    from mmengine.runner import Runner
    cfg = base_cfg(config, work_dir)
    set_providers(cfg, providers, iters + 1)
    cfg.resume, cfg.load_from = True, ckpt
    sink = {}
    runner = Runner.from_cfg(cfg)
    runner.register_hook(_StopAtFirstStep(sink), priority='HIGHEST')
    restore = _time_replay(iters, stock_limit, sink) if providers is STOCK else (lambda: None)
    t0 = time.perf_counter()
    try:
        runner.train()
    except _FirstStep:
        pass
    except _ReplayCut:
        return dict(total_s=None, data_s=None, replayed=sink['replayed'], replay_s=sink['replay_s'],
                    extrapolated_data_s=sink['replay_s'] * iters / sink['replayed'], batch=None)
    finally:
        restore()
    data_s = sink['replay_s'] if providers is STOCK else runner.train_loop.resume_seconds
    return dict(total_s=sink['first_step'] - t0, data_s=data_s, batch=sink['batch'])


class _ReplayCut(Exception):
    pass


def _time_replay(iters, limit, sink):
    """Time mmengine's replay (its ``next(self.dataloader_iterator)`` loop over ``iters`` batches); stop it
    after ``limit`` seconds. Returns the function that removes the instrumentation."""
    from mmengine.runner import loops
    original = loops._InfiniteDataloaderIterator.__next__
    state = dict(n=0, t0=None)

    def timed_next(self):
        if state['t0'] is None:
            state['t0'] = time.perf_counter()
        batch = original(self)
        if state['n'] < iters:  # the replay; the next call is the first training batch
            state['n'] += 1
            sink['replayed'], sink['replay_s'] = state['n'], time.perf_counter() - state['t0']
            if sink['replay_s'] > limit:
                raise _ReplayCut
        return batch

    loops._InfiniteDataloaderIterator.__next__ = timed_next

    def restore():
        loops._InfiniteDataloaderIterator.__next__ = original
    return restore


def bench_resume(args, work_root):
    ckpt = make_checkpoint(args.config, osp.join(work_root, 'ckpt'), args.iters)
    results = {}
    for name, providers in (('resumable', RESUMABLE), ('stock', STOCK)):
        results[name] = time_resume(args.config, providers, ckpt, args.iters, osp.join(work_root, name),
                                    args.stock_limit)
        print(f'  {name}: {results[name]}', flush=True)
    if results['stock']['batch'] is not None:
        assert results['stock']['batch'] == results['resumable']['batch'], 'providers disagree on the batch'
    return results


def bench_ssm_stats(args):
    """One step of the demo detector without / with an idle / with a recording SSMStatsHook.

    Steps are timed in CPU seconds of this process (``time.process_time``) with ``--threads`` torch
    threads, and the minimum over repeats is the estimate (the least disturbed sample; on a shared machine
    identical steps vary by 2x in wall time). The hook's own work is also timed directly: summaries and
    collection on a recording step, and the idle callbacks (forward and gradient hooks that return at once).
    """
    torch.set_num_threads(args.threads)
    from mmengine.runner import Runner

    from projects.vim_disc.engine import hooks as hooks_module
    from projects.vim_disc.engine.hooks import SSMStatsHook
    cfg = base_cfg(args.config, tempfile.mkdtemp(prefix='ssmstats_'))
    set_providers(cfg, RESUMABLE, 10 ** 6)
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    runner = Runner.from_cfg(cfg)
    runner._train_loop = runner.build_train_loop(runner._train_loop)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    model = runner.model
    batch = next(iter(runner.train_dataloader))
    hook = SSMStatsHook(interval=10 ** 9, print_table=False)
    hook.before_train(runner)

    hook_cpu = [0.0]
    summarize = hooks_module.summarize_direction

    def timed_summarize(*a, **k):
        t0 = time.process_time()
        out = summarize(*a, **k)
        hook_cpu[0] += time.process_time() - t0
        return out

    hooks_module.summarize_direction = timed_summarize

    def step(record):
        for m in hook.mixers.values():
            m.record_stats = record
        hook._active = record
        t0 = time.process_time()
        model.train_step(batch, optim_wrapper=runner.optim_wrapper)
        if record:
            t1 = time.process_time()
            hook._collect()
            hook_cpu[0] += time.process_time() - t1
        return time.process_time() - t0

    def unhooked():
        for h in hook._handles:
            h.remove()
        hook._handles = []
        t = step(False)
        hook.before_train(runner)  # register the hooks again
        return t

    step(False)  # warm-up
    times = dict(plain=[], idle=[], record=[])
    hook_work = []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every variant alike
        times['plain'].append(unhooked())
        times['idle'].append(step(False))
        hook_cpu[0] = 0.0
        times['record'].append(step(True))
        hook_work.append(hook_cpu[0])
    hooks_module.summarize_direction = summarize
    idle_call_s = _idle_callbacks_seconds(hook)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    n = args.interval
    overhead = ((best['record'] - best['plain']) + (n - 1) * (best['idle'] - best['plain'])) / (n * best['plain'])
    direct = (min(hook_work) + (n - 1) * idle_call_s) / (n * best['plain'])
    return dict(clock=f'process_time (CPU s), {args.threads} torch thread(s)', min_s=best, median_s=med,
                all_s=times, interval=n, overhead_fraction=overhead, hook_work_s=hook_work,
                idle_callbacks_s=idle_call_s, hook_work_fraction=direct, layers=len(hook.mixers))


def _idle_callbacks_seconds(hook, calls=2000):
    """CPU seconds per training step of the callbacks an idle SSMStatsHook leaves registered."""
    hook._active = False
    mixer = next(iter(hook.mixers.values()))
    forward = mixer._forward_hooks[next(iter(mixer._forward_hooks))]
    param = mixer.A_log
    grad_hook = next(iter(param._post_accumulate_grad_hooks.values()))
    n_forward = len(hook.mixers)
    n_grad = sum(len(p._post_accumulate_grad_hooks or {}) for m in hook.mixers.values() for p in m.parameters())
    t0 = time.process_time()
    for _ in range(calls):
        forward(mixer, (), None)
    t1 = time.process_time()
    for _ in range(calls):
        grad_hook(param)
    t2 = time.process_time()
    return (n_forward * (t1 - t0) + n_grad * (t2 - t1)) / calls


def main():
    args = parse_args()
    install_safe_checkpoint_loading()
    work_root = args.work_dir or tempfile.mkdtemp(prefix='benchmark_resume_')
    os.makedirs(work_root, exist_ok=True)
    report = dict(config=args.config, iters=args.iters, machine=platform.platform(), cpus=os.cpu_count(),
                  torch=torch.__version__, python=sys.version.split()[0])
    if 'resume' in args.what:
        print(f'resume at iteration {args.iters} ({args.config})', flush=True)
        report['resume'] = bench_resume(args, work_root)
    if 'ssm-stats' in args.what:
        print('SSMStatsHook overhead (one demo training step, CPU)', flush=True)
        report['ssm_stats'] = bench_ssm_stats(args)

    print()
    if 'resume' in report:
        print(f'{"provider":<11}{"resume-to-first-step (s)":>26}{"data positioning (s)":>22}')
        for name, r in report['resume'].items():
            if r['total_s'] is None:
                print(f'{name:<11}{"> " + format(args.stock_limit, ".0f"):>26}'
                      f'{"~" + format(r["extrapolated_data_s"], ".0f") + " (extrapolated)":>22}'
                      f'   replayed {r["replayed"]} batches in {r["replay_s"]:.1f} s')
            else:
                print(f'{name:<11}{r["total_s"]:>26.2f}{r["data_s"]:>22.2f}')
    if 'ssm_stats' in report:
        s = report['ssm_stats']
        print(f'{"variant":<9}{"min step (CPU s)":>18}{"median (CPU s)":>16}')
        for k, v in s['min_s'].items():
            print(f'{k:<9}{v:>18.4f}{s["median_s"][k]:>16.4f}')
        print(f'overhead at interval {s["interval"]}: {100 * s["overhead_fraction"]:.2f} % from step times; '
              f'{100 * s["hook_work_fraction"]:.3f} % from the hook\'s own work ({min(s["hook_work_s"]):.4f} CPU s '
              f'per recording step, {1e6 * s["idle_callbacks_s"]:.1f} us per idle step; {s["layers"]} layers)')
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

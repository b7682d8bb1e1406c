"""Train the full detector of ``configs/vim_<rule>.py`` on synthetic COCO-like inputs and report speed and memory.

    python benchmarks/benchmark_train.py [configs/vim_zoh.py ...] --iters 30 --precision bf16 fp32 \
        --cuda-graph on off --out bench_train.json --cfg-options model.backbone.init_cfg=None

Per config, precision and backbone CUDA graph (on: ``model.backbone.cuda_graph=True``, the backbone captures
its forward and backward; off: eager): seconds per iteration (median after warm-up), peak GPU memory, and
whether every loss of every iteration was finite (plus the number of non-finite steps the guard skipped, when
the config uses it). Default configs: the six ``configs/vim_<rule>.py``. Images are random noise with random
boxes and box-shaped masks: enough to exercise every head at full size. Ends with a table and, per config and
graph setting, the bf16 step's speed-up over fp32.
"""
import argparse
import json
import os
import statistics
import sys
import time

from _bootstrap import setup_repo_path

REPO_ROOT = setup_repo_path()

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import projects.vim_disc  # noqa: E402,F401
from projects.vim_disc.engine.optim_wrapper import SKIPS_TOTAL  # noqa: E402
from projects.vim_disc.models.cuda_graph import cuda_graph_state  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402

RULE_CONFIGS = [f'configs/vim_{rule}.py' for rule in ('zoh', 'foh', 'bilinear', 'poly', 'highorder', 'rk4')]


def synthetic_batch(batch_size, size, num_classes, generator, max_objects=12):
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))
        n = int(torch.randint(1, max_objects + 1, (1, ), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * size * 0.8
        wh = (torch.rand(n, 2, generator=generator) * 0.4 + 0.05) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                                             scale_factor=(1.0, 1.0), batch_input_shape=(size, size)))
        sample.gt_instances = InstanceData(
            bboxes=boxes, labels=torch.randint(0, num_classes, (n, ), generator=generator),
            masks=BitmapMasks(masks.numpy(), size, size))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def optim_cfg_for(cfg, precision):
    optim = cfg.optim_wrapper.copy()
    base_type = optim.get('type', 'OptimWrapper').replace('Amp', '')
    if precision == 'fp32':
        optim['type'] = base_type
        optim.pop('loss_scale', None)
        optim.pop('dtype', None)
    else:
        optim['type'] = base_type.replace('OptimWrapper', 'AmpOptimWrapper')
        optim['dtype'] = 'bfloat16' if precision == 'bf16' else 'float16'
        optim.setdefault('loss_scale', 'dynamic')
    return optim


def graph_counts(backbone):
    """Did the captured rows replay? (captures, replays, eager calls, why capture is off if it is)"""
    st = cuda_graph_state(backbone)
    return dict(captures=st.captures, replays=st.replays, eager_calls=st.eager_calls, disabled=st.disabled)


def run(config, precision, graph, args):
    cfg = Config.fromfile(config if os.path.exists(config) else os.path.join(REPO_ROOT, config))
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.model.backbone.cuda_graph = graph == 'on'
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).cuda()
    model.init_weights()
    model.train()
    optim_wrapper = build_optim_wrapper(model, optim_cfg_for(cfg, precision))
    num_classes = cfg.model.roi_head.bbox_head[0].num_classes
    gen = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(args.batch, args.size, num_classes, gen) for _ in range(4)]
    times, nonfinite = [], 0
    torch.cuda.reset_peak_memory_stats()
    for it in range(args.warmup + args.iters):
        if it == args.warmup:  # the steady state: after the warm-up (and the capture) is done
            peak_warmup = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = model.train_step(batches[it % len(batches)], optim_wrapper)
        torch.cuda.synchronize()
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
        if not all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values()):
            nonfinite += 1
    # the guarded wrappers count skipped updates in the message hub; None for mmengine's plain wrappers
    skipped = (optim_wrapper.message_hub.get_info(SKIPS_TOTAL, 0)
               if hasattr(optim_wrapper, 'consecutive_skips') else None)
    return dict(config=config, precision=precision, cuda_graph=graph, batch=args.batch, size=args.size,
                iters=args.iters,
                s_per_iter=statistics.median(times), s_per_iter_min=min(times),
                peak_mem_gib=max(peak_warmup, torch.cuda.max_memory_allocated()) / 2**30,
                peak_mem_steady_gib=torch.cuda.max_memory_allocated() / 2**30, nonfinite_iters=nonfinite,
                graph=graph_counts(model.backbone),
                guard_skipped_steps=skipped, final_loss=float(losses['loss']))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', default=RULE_CONFIGS, help='default: the six configs/vim_<rule>.py')
    parser.add_argument('--precision', nargs='+', default=['bf16', 'fp32'], choices=['bf16', 'fp16', 'fp32'])
    parser.add_argument('--cuda-graph', nargs='+', default=['on', 'off'], choices=['on', 'off'],
                        help="the backbone's CUDA graph (model.backbone.cuda_graph)")
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('benchmark_train.py needs a CUDA GPU')
    results = []
    for config in args.configs:
        for graph in args.cuda_graph:
            for precision in args.precision:
                r = run(config, precision, graph, args)
                results.append(r)
                print(f"{r['config']:<28} {precision:<5} graph {graph:<3} {r['s_per_iter']:.3f} s/iter  "
                      f"peak {r['peak_mem_gib']:.2f} GiB  non-finite iters {r['nonfinite_iters']}  "
                      f"skipped {r['guard_skipped_steps']}", flush=True)
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    speedups = print_table(results)
    print(f'card: {device}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(device=device, torch=torch.__version__, argv=sys.argv, results=results,
                           bf16_speedup_over_fp32=speedups), f, indent=1)


def print_table(results):
    """The rows, then fp32 s/iter over bf16 s/iter per config and graph setting (> 1: bf16 is faster)."""
    print(f"\n{'config':<28} {'precision':<9} {'graph':<5} {'s/iter':>7} {'peak GiB':>8} {'non-finite':>10}")
    for r in results:
        print(f"{r['config']:<28} {r['precision']:<9} {r['cuda_graph']:<5} {r['s_per_iter']:7.3f} "
              f"{r['peak_mem_gib']:8.2f} {r['nonfinite_iters']:10d}")
    by_key = {(r['config'], r['cuda_graph'], r['precision']): r['s_per_iter'] for r in results}
    speedups = []
    for (config, graph, precision), s in by_key.items():
        if precision == 'bf16' and (config, graph, 'fp32') in by_key:
            speedups.append(dict(config=config, cuda_graph=graph, ratio=by_key[(config, graph, 'fp32')] / s))
    if speedups:
        print('\nbf16 step vs fp32 step (fp32 s / bf16 s; > 1: bf16 faster):')
        for sp in speedups:
            print(f"  {sp['config']:<28} graph {sp['cuda_graph']:<3} {sp['ratio']:.2f}x")
    return speedups


if __name__ == '__main__':
    main()

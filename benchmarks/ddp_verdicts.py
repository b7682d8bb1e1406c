"""Verdicts of benchmarks/benchmark_ddp.py's checks: pure functions of the runs' records, checkpoints and exit
states (so they are tested on mutated copies of real records), and the loss / weight comparisons they use.
"""
import math
import os.path as osp

import numpy as np
import torch


def compare_weights(a: dict, b: dict, init: dict = None) -> dict:
    """max |a - b|, that over max |b|, and the drift |a - b| / |b - init| (L2 over all floating tensors)."""
    keys = [k for k in b if torch.is_floating_point(b[k])]
    if sorted(keys) != sorted(k for k in a if torch.is_floating_point(a[k])):
        return dict(same_keys=False)
    diff2 = move2 = 0.0
    max_abs = max_ref = 0.0
    for k in keys:
        d = (a[k].double() - b[k].double())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
        max_ref = max(max_ref, float(b[k].double().abs().max()) if d.numel() else 0.0)
        diff2 += float(d.square().sum())
        if init is not None:
            move2 += float((b[k].double() - init[k].double()).square().sum())
    out = dict(same_keys=True, max_abs=max_abs, max_rel=max_abs / max_ref if max_ref else math.inf)
    if init is not None:
        out['movement'] = math.sqrt(move2)
        out['drift'] = math.sqrt(diff2) / math.sqrt(move2) if move2 else math.inf
    return out


def compare_losses(pairs) -> dict:
    """pairs: (iteration, a, b) total losses; max abs, max rel (|a - b| / |b|) and the max rel per iteration."""
    if not pairs:
        return dict(n=0, max_abs=None, max_rel=None, max_rel_by_iter={})
    rel = [(i, 0.0 if a == b else abs(a - b) / abs(b) if b and math.isfinite(a - b) else math.inf)
           for i, a, b in pairs]
    by_iter = {}
    for i, r in rel:
        by_iter[i] = max(by_iter.get(i, 0.0), r)
    abs_d = [abs(a - b) if math.isfinite(a - b) else math.inf for _, a, b in pairs]
    return dict(n=len(pairs), max_abs=max(abs_d), max_rel=max(r for _, r in rel),
                all_finite=all(math.isfinite(a) and math.isfinite(b) for _, a, b in pairs),
                max_rel_by_iter=by_iter)


def _failed_run(run) -> str:
    if run is None:
        return 'not run'
    if run.get('skipped'):
        return run['skipped']
    if run.get('hung'):
        return f"{run['name']} hung: killed after {run['timeout_s']:.0f} s"
    if run.get('rc') != 0:
        return f"{run['name']} exited with {run['rc']} (see {run.get('log')})"
    return ''


def _replicas_equal(recs) -> list:
    """Iterations at which the ranks' weight fingerprints differ."""
    its = sorted(set.intersection(*(set(r['iters']) for r in recs)))
    return [i for i in its if len({r['iters'][i]['fingerprint'] for r in recs}) > 1]


def verdict_launch(run, recs, iters: int, checkpoints: list, logged_iters: list) -> dict:
    problems = []
    why = _failed_run(run)
    if why:
        problems.append(why)
    for r, rec in enumerate(recs):
        missing = [i for i in range(1, iters + 1) if i not in rec['iters']]
        if missing:
            problems.append(f'rank {r} recorded no iteration {missing[:5]}')
        bad = [i for i, row in rec['iters'].items() if not math.isfinite(row['losses'].get('loss', math.nan))]
        if bad:
            problems.append(f'rank {r}: non-finite loss at iterations {bad[:5]}')
        if rec['end'] is None:
            problems.append(f'rank {r} did not finish')
    if sorted(logged_iters) != list(range(1, iters + 1)):
        problems.append(f"rank 0's log has iterations {sorted(logged_iters)[:3]}..., not 1..{iters}")
    names = sorted(osp.basename(c) for c in checkpoints)
    if names != [f'iter_{iters}.pth']:
        problems.append(f'checkpoints {names}, expected exactly iter_{iters}.pth')
    apart = _replicas_equal(recs) if all(rec['iters'] for rec in recs) else []
    if apart:
        problems.append(f'the replicas differ after iterations {apart[:5]}')
    start = recs[0]['start'] or {}
    return dict(passed=not problems, problems=problems, checkpoints=names, world_size=start.get('world_size'),
                backend=start.get('backend'), wrapper=start.get('wrapper'), amp_dtype=start.get('amp_dtype'),
                device=start.get('device'), cuda_graph=[(rec['end'] or {}).get('cuda_graph') for rec in recs],
                iters_recorded=[len(rec['iters']) for rec in recs])


def verdict_equivalence(ddp_recs, single_recs, ddp_w: dict, single_w: dict, init_w: dict, ddp_run, single_run,
                        iters: int, loss_rtol: float, weight_rtol: float) -> dict:
    """ddp rank r, iteration i (1-based) <-> single iteration 2(i - 1) + r + 1."""
    problems = [p for p in (_failed_run(ddp_run), _failed_run(single_run)) if p]
    pairs, id_mismatch, per_term = [], [], {}
    for i in range(1, iters + 1):
        for r, rec in enumerate(ddp_recs):
            a, b = rec['iters'].get(i), single_recs[0]['iters'].get(2 * (i - 1) + r + 1)
            if a is None or b is None:
                continue
            if a['ids'] != b['ids']:
                id_mismatch.append((i, r, a['ids'], b['ids']))
            pairs.append((i, a['losses']['loss'], b['losses']['loss']))
            for k, v in a['losses'].items():
                if k in b['losses']:
                    per_term[k] = max(per_term.get(k, 0.0), abs(v - b['losses'][k]))
    if not problems and len(pairs) != 2 * iters:
        problems.append(f'{len(pairs)} of {2 * iters} per-sample losses recorded')
    if id_mismatch:
        i, r, a, b = id_mismatch[0]
        problems.append(f'different samples: ddp rank {r} iter {i} saw {a}, single iter {2 * (i - 1) + r + 1} '
                        f'saw {b} ({len(id_mismatch)} mismatches)')
    start_d, start_s = ddp_recs[0]['start'] or {}, single_recs[0]['start'] or {}
    same_init = start_d.get('fingerprint') is not None and start_d.get('fingerprint') == start_s.get('fingerprint')
    if not same_init and not problems:
        problems.append('different initial weights')
    losses = compare_losses(pairs)
    if losses['n'] and not losses['max_rel'] <= loss_rtol:
        problems.append(f"per-sample losses differ by up to {losses['max_rel']:.3g} (rel) > {loss_rtol:g}")
    weights = compare_weights(ddp_w, single_w, init_w) if ddp_w is not None and single_w is not None else None
    if weights is None:
        if not problems:
            problems.append('final weights missing')
    elif not weights.get('same_keys'):
        problems.append('the two final checkpoints hold different parameters')
    elif not weights['drift'] <= weight_rtol:
        problems.append(f"final weights drift {weights['drift']:.3g} of the training movement > {weight_rtol:g}")
    return dict(passed=not problems, problems=problems, same_initial_weights=same_init, losses=losses,
                max_abs_per_loss_term=per_term, weights=weights, loss_rtol=loss_rtol, weight_rtol=weight_rtol,
                samples_compared=len(pairs), sample_id_mismatches=len(id_mismatch))


def verdict_guard(run, recs, iters: int, nan_iter: int, nan_rank: int = 1) -> dict:
    problems = []
    why = _failed_run(run)
    if why:
        problems.append(why)
    per_rank = []
    for r, rec in enumerate(recs):
        its = rec['iters']
        if sorted(its) != list(range(1, iters + 1)):
            problems.append(f'rank {r} recorded iterations {sorted(its)[:3]}..., not 1..{iters}')
            per_rank.append(None)
            continue
        prev = {i: (its[i - 1]['fingerprint'] if i > 1 else rec['start']['fingerprint']) for i in its}
        unchanged = [i for i in its if its[i]['fingerprint'] == prev[i]]
        skipped = [i for i in its if its[i]['skipped']]
        # an fp16/bf16 loss-scale overflow also leaves the weights as they were (GradScaler's own skip)
        overflow_count = {i: its[i].get('amp_overflows') or 0 for i in its}
        overflows = [i for i in its if overflow_count[i] > overflow_count.get(i - 1, 0)]
        last = its[iters]
        info = dict(skips_total=last['skips'], skipped_iters=skipped, unchanged_iters=unchanged,
                    amp_overflow_iters=overflows, last_skip=its[nan_iter].get('last_skip'))
        per_rank.append(info)
        if unchanged != sorted({nan_iter, *overflows}):
            problems.append(f'rank {r}: weights unchanged at iterations {unchanged}, expected exactly [{nan_iter}]'
                            + (f' and the loss-scale overflows {overflows}' if overflows else ''))
        if skipped != [nan_iter]:
            problems.append(f'rank {r}: skipped updates at {skipped}, expected [{nan_iter}]')
        if last['skips'] != 1:
            problems.append(f"rank {r}: skip counter {last['skips']}, expected 1")
        loss_ranks = (info['last_skip'] or {}).get('loss_ranks')
        if loss_ranks != [nan_rank]:
            problems.append(f'rank {r}: the skip names loss ranks {loss_ranks}, expected [{nan_rank}]')
        after = [i for i in its if i > nan_iter and not math.isfinite(its[i]['losses'].get('loss', math.nan))]
        if after:
            problems.append(f'rank {r}: non-finite losses after the skip at {after}')
    if all(per_rank) and len({p['skips_total'] for p in per_rank}) > 1:
        problems.append(f"skip counters disagree across ranks: {[p['skips_total'] for p in per_rank]}")
    if all(rec['iters'] for rec in recs):
        apart = _replicas_equal(recs)
        if apart:
            problems.append(f'the replicas differ after iterations {apart[:5]}')
    return dict(passed=not problems, problems=problems, nan_iter=nan_iter, nan_rank=nan_rank, iters=iters,
                per_rank=per_rank)


def verdict_resume(stop_run, resume_run, stop_recs, resume_recs, ddp_recs, stop_at: int, iters: int,
                   stop_ckpts: list, resumed_w: dict, ddp_w: dict, init_w: dict, weight_rtol: float,
                   loss_rtol: float) -> dict:
    problems = [p for p in (_failed_run(stop_run), _failed_run(resume_run)) if p]
    for r, rec in enumerate(stop_recs):
        if rec['iters'] and max(rec['iters']) != stop_at:
            problems.append(f"rank {r} of the stopped run ended at iteration {max(rec['iters'])}, not {stop_at}")
    if f'iter_{stop_at}.pth' not in [osp.basename(c) for c in stop_ckpts]:
        problems.append(f'no checkpoint iter_{stop_at}.pth from the stop')
    pairs = []
    for r, rec in enumerate(resume_recs):
        if rec['start'] and rec['start']['iter'] != stop_at:
            problems.append(f"rank {r} resumed at iteration {rec['start']['iter']}, not {stop_at}")
        if sorted(rec['iters']) != list(range(stop_at + 1, iters + 1)):
            problems.append(f'rank {r} of the resumed run recorded {sorted(rec["iters"])[:3]}..., '
                            f'not {stop_at + 1}..{iters}')
        for i, row in rec['iters'].items():
            ref = ddp_recs[r]['iters'].get(i)
            if ref is not None:
                pairs.append((i, row['losses']['loss'], ref['losses']['loss']))
    losses = compare_losses(pairs)
    if losses['n'] and not losses['max_rel'] <= loss_rtol:
        problems.append(f"losses after the resume differ by up to {losses['max_rel']:.3g} (rel) > {loss_rtol:g}")
    weights = compare_weights(resumed_w, ddp_w, init_w) if resumed_w is not None and ddp_w is not None else None
    if weights is None:
        if not problems:
            problems.append('final weights missing')
    elif not weights.get('same_keys') or not weights['drift'] <= weight_rtol:
        problems.append(f"final weights drift {weights.get('drift')} of the training movement > {weight_rtol:g}")
    return dict(passed=not problems, problems=problems, stopped_at=stop_at, losses=losses, weights=weights,
                weight_rtol=weight_rtol, loss_rtol=loss_rtol)


def throughput(recs, warmup: int, world_size: int, batch_size: int = 1) -> dict:
    """images/s from the log's per-iteration time after ``warmup`` iterations (rank 0)."""
    times = [row['time'] for i, row in sorted(recs[0]['iters'].items()) if i > warmup and row['time'] is not None]
    if not times:
        return None
    return dict(iters=len(times), s_per_iter_median=float(np.median(times)), s_per_iter_mean=float(np.mean(times)),
                images_per_s=world_size * batch_size * len(times) / sum(times))

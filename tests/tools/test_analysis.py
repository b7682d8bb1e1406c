"""tools/analysis: each figure is drawn from small synthetic inputs and checked for what it shows (labels,
data, shaded ranges), not only for existing; the FLOP formula is held to a hand count and to torch's own
counter on the parts a tracer can see."""
import importlib.util
import json
import math
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'analysis_{name}', osp.join(ROOT, 'tools', 'analysis', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_disc = load_tool('plot_discretization')
compare = load_tool('compare_runs')
browse_tool = load_tool('browse_dataset')
flops = load_tool('get_flops')


def assert_png(path, min_size=(200, 150)):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == 'PNG'
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        return im.size


def write_config(path, body):
    path.write_text(body)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# plot_discretization
# ----------------------------------------------------------------------------------------------------
def test_rule_curves_agree_with_closed_forms():
    z = torch.tensor([-50.0, -3.0, -1.0, -1e-3], dtype=torch.float64)
    curves = plot_disc.rule_curves(z)
    assert set(curves) == {'zoh', 'foh', 'bilinear', 'poly', 'highorder', 'rk4'}
    e = np.exp(z.numpy())
    phi1 = np.expm1(z.numpy()) / z.numpy()
    for name in ('zoh', 'foh', 'poly', 'highorder'):
        np.testing.assert_allclose(curves[name]['abar_abs'], e, rtol=1e-12)
    np.testing.assert_allclose(curves['zoh']['gain'], 1.0)
    for name in ('foh', 'poly', 'highorder'):  # exponential holds integrate a constant input exactly
        np.testing.assert_allclose(curves[name]['gain'], phi1, rtol=1e-9)
    zn = z.numpy()
    np.testing.assert_allclose(curves['bilinear']['abar_abs'], np.abs((2 + zn) / (2 - zn)), rtol=1e-12)
    np.testing.assert_allclose(curves['bilinear']['gain'], 2 / (2 - zn), rtol=1e-12)
    # rk4: Abar > 1 and a negative gain beyond its stability bound (-2.785), fine inside it
    assert curves['rk4']['abar_abs'][0] > 1 and curves['rk4']['gain'][0] < 0
    assert curves['rk4']['abar_abs'][1] > 1 and curves['rk4']['gain'][1] < 0
    assert curves['rk4']['abar_abs'][2] < 1 and curves['rk4']['gain'][2] > 0
    assert curves['rk4']['z_stable'] == pytest.approx(-2.785293563405282)
    # newest-sample share near z = 0: trapezoid 1/2, poly 5/12, Adams-Moulton 9/24 (docs/discretization.md)
    share = {k: c['newest_share'][-1] for k, c in curves.items()}
    assert share['zoh'] == share['bilinear'] == 1.0
    assert share['foh'] == pytest.approx(0.5, abs=1e-3)
    assert share['poly'] == pytest.approx(5 / 12, abs=1e-3)
    assert share['highorder'] == pytest.approx(9 / 24, abs=1e-3)


def test_init_z_range_takes_mamba_defaults_for_missing_keys():
    z_lo, z_hi, dt_min, dt_max, n = plot_disc.init_z_range(dict(dt_min=0.002))
    assert (dt_min, dt_max, n) == (0.002, 0.1, 16)
    assert (z_lo, z_hi) == pytest.approx((-0.1 * 16, -0.002))
    assert plot_disc.init_z_range(None)[:2] == pytest.approx((-1.6, -0.001))
    assert plot_disc.init_z_range(dict(d_state=7, dt_max=0.03))[:2] == pytest.approx((-0.21, -0.001))


@pytest.fixture
def rule_configs(tmp_path):
    a = write_config(tmp_path / 'a.py', "model = dict(backbone=dict(type='VimBackbone', discretization='rk4', "
                                        "ssm_cfg=dict(dt_min=0.0005, dt_max=0.05)))\n")
    b = write_config(tmp_path / 'b.py', "model = dict(backbone=dict(type='VimBackbone', "
                                        "discretization=dict(type='foh'), ssm_cfg=dict(d_state=8)))\n")
    return [a, b]


def test_config_init_ranges_read_each_rule_config(rule_configs, tmp_path):
    ranges = plot_disc.config_init_ranges(rule_configs)
    assert set(ranges) == {'rk4', 'foh'}
    assert (ranges['rk4']['z_lo'], ranges['rk4']['z_hi']) == pytest.approx((-0.8, -0.0005))
    assert (ranges['foh']['z_lo'], ranges['foh']['z_hi']) == pytest.approx((-0.8, -0.001))
    dup = write_config(tmp_path / 'c.py', "model = dict(backbone=dict(discretization='rk4'))\n")
    with pytest.raises(ValueError, match='two configs set rule'):
        plot_disc.config_init_ranges(rule_configs + [dup])


def test_discretization_figure_shows_every_rule_bound_and_range(rule_configs, tmp_path):
    z = plot_disc.z_grid(num=97)
    assert z[0] == pytest.approx(-1e3) and z[-1] == pytest.approx(-1e-4)
    curves = plot_disc.rule_curves(z)
    out = tmp_path / 'disc.png'
    fig, drawn = plot_disc.plot_discretization(curves, plot_disc.config_init_ranges(rule_configs), out=str(out))
    assert_png(out, (600, 600))
    ax_abar, ax_gain, ax_share, ax_init = fig.axes
    labels = [line.get_label() for line in ax_abar.get_lines()]
    for name in curves:
        assert any(label.startswith(f'{name} (K=') for label in labels), name
        line = next(ln for ln in ax_abar.get_lines() if ln.get_label().startswith(f'{name} (K='))
        np.testing.assert_allclose(line.get_xdata(), -z.numpy())  # x is |z| on a log axis
        np.testing.assert_allclose(line.get_ydata(), curves[name]['abar_abs'])
    assert ax_abar.get_xscale() == 'log' and ax_abar.get_yscale() == 'log'
    assert ax_abar.get_xlim()[0] == pytest.approx(1e3) and ax_abar.get_xlim()[1] == pytest.approx(1e-4)
    assert 'clamped to z >= -2.785' in ' '.join(labels)
    # rk4's negative gain beyond its bound is drawn as its own (dotted) series
    neg = next(ln for ln in ax_gain.get_lines() if ln.get_label() == 'rk4 (negative)')
    assert neg.get_linestyle() == ':' and np.isfinite(neg.get_ydata()).sum() > 0
    # the stability bound is a vertical line at |z| = 2.785 in every panel
    assert drawn['bounds'] == {'rk4': pytest.approx(-2.785293563405282)}
    for ax in fig.axes:
        xs = [ln.get_xdata()[0] for ln in ax.get_lines() if len(set(np.atleast_1d(ln.get_xdata()))) == 1]
        assert any(x == pytest.approx(2.785293563405282) for x in xs)
    # one shaded span per config, at that rule's init range
    spans = sorted(tuple(sorted((p.get_bbox().x0, p.get_bbox().x1))) for p in ax_init.patches)
    np.testing.assert_allclose(spans, [(0.0005, 0.8), (0.001, 0.8)])
    assert drawn['init_ranges'] == {'rk4': pytest.approx((-0.8, -0.0005)), 'foh': pytest.approx((-0.8, -0.001))}


def test_plot_discretization_cli_reads_the_repo_rule_configs(tmp_path, monkeypatch):
    from mmengine.config import Config
    out = tmp_path / 'cli.png'
    monkeypatch.setattr(sys, 'argv', ['plot_discretization.py', '--out', str(out), '--dpi', '40'])
    plot_disc.main()
    assert_png(out)
    configs = plot_disc.default_configs()
    assert len(configs) == 6
    ranges = plot_disc.config_init_ranges(configs)
    for rule, r in ranges.items():
        ssm = Config.fromfile(r['config']).model.backbone.ssm_cfg
        assert r['z_hi'] == pytest.approx(-ssm.get('dt_min', 0.001))
        assert r['z_lo'] == pytest.approx(-ssm.get('dt_max', 0.1) * ssm.get('d_state', 16))


# ----------------------------------------------------------------------------------------------------
# compare_runs
# ----------------------------------------------------------------------------------------------------
def write_segment(work_dir, stamp, rows, tail=''):
    d = work_dir / stamp / 'vis_data'
    d.mkdir(parents=True)
    with open(d / 'scalars.json', 'w') as f:
        for row in rows:
            f.write(json.dumps(row) + '\n')
        f.write(tail)


def train_row(it, loss, skipped=None, **extra):
    """A training line as LoggerHook writes it. `skipped`: the guard's running count at this iteration (keys
    outside LogProcessor's mean pattern are logged as their value at the logged iteration)."""
    row = {'lr': 1e-4, 'loss': loss, 'loss_rpn_cls': loss / 4, 's0.loss_mask': loss / 3, 's0.acc': 90.0,
           'grad_norm': 10.0 / it, 'time': 1.0, 'iter': it, 'step': it, **extra}
    if skipped is not None:
        row['nonfinite_skipped_steps'] = float(skipped)
    return row


def val_row(step, bbox, segm):
    return {'coco/bbox_mAP': bbox, 'coco/bbox_mAP_50': bbox * 2, 'coco/segm_mAP': segm, 'time': 0.5,
            'step': step}


@pytest.fixture
def runs_dir(tmp_path):
    # run "zoh", stock mmengine runner (a folder per launch), fp16: launched, killed after iteration 60 (a line
    # half written), resumed from the iteration-40 checkpoint, whose message hub held 2 skips; iterations 50
    # and 60 are logged twice, the resumed values must win (the 6 skips of the killed launch are undone).
    zoh = tmp_path / 'zoh'
    amp = dict(amp_overflow_skipped_steps=7.0, loss_scale=512.0)  # counted apart, not skipped updates
    first = [train_row(i, 2.0 - i / 100, skipped=n, **amp) for i, n in ((10, 0), (20, 0), (30, 2), (40, 2))]
    # validation lines stamped with the epoch (0), as LoggerHook's default log_metric_by_epoch=True writes them
    first += [val_row(0, 0.10, 0.08)] + [train_row(i, 5.0, skipped=n, **amp) for i, n in ((50, 5), (60, 8))]
    write_segment(zoh, '20260101_000000', first, tail='{"loss": 1.0, "st')
    second = [train_row(i, 1.6 - i / 1000, skipped=n, **amp) for i, n in ((50, 2), (60, 2), (70, 3), (80, 3))]
    write_segment(zoh, '20260101_020000', second + [val_row(0, 0.20, 0.15)])
    # run "rk4": one segment, another trainer's running count
    rk4 = tmp_path / 'rk4'
    # validation lines stamped with the iteration (log_metric_by_epoch=False)
    rows = [train_row(i, 1.9 - i / 200, **{'nonfinite/skipped_steps': float(i // 40)}) for i in (10, 20, 40, 80)]
    write_segment(rk4, '20260102_000000', rows[:3] + [val_row(40, 0.3, 0.25)] + rows[3:] + [val_row(80, 0.25, 0.2)])
    # run "foh": no running count, only a per-step 0/1 flag (one sample per logging interval), no validation yet
    foh = tmp_path / 'foh'
    write_segment(foh, '20260103_000000', [train_row(i, 1.8, nonfinite_skip=1.0) for i in (10, 20)])
    return tmp_path


def test_segments_are_joined_and_later_ones_override(runs_dir):
    assert [osp.basename(osp.dirname(osp.dirname(p))) for p in compare.find_segments(str(runs_dir / 'zoh'))] == [
        '20260101_000000', '20260101_020000']
    with pytest.warns(UserWarning, match='not valid JSON'):
        run = compare.load_run(str(runs_dir / 'zoh'))
    steps, loss = run['loss']
    assert steps.tolist() == [10, 20, 30, 40, 50, 60, 70, 80]
    np.testing.assert_allclose(loss, [1.9, 1.8, 1.7, 1.6, 1.55, 1.54, 1.53, 1.52])
    assert run['coco/bbox_mAP'][0].tolist() == [40, 80]
    np.testing.assert_allclose(run['coco/bbox_mAP'][1], [0.10, 0.20])
    assert 'iter' not in run and 'step' not in run
    # the guard's count, not the AMP overflows; the killed launch's counts at 50 and 60 were superseded
    skip_steps, skipped = compare.skipped_steps(run)
    assert skip_steps.tolist() == steps.tolist()
    np.testing.assert_allclose(skipped, [0, 0, 2, 2, 2, 2, 3, 3])


def test_a_folder_appended_by_a_resume_and_a_rollback(tmp_path):
    """ResumableRunner's layout: one folder; a resumed launch appends to scalars.json, right after a cut line."""
    first = [train_row(i, loss, skipped=n) for i, loss, n in ((10, 3.0, 0), (20, 2.9, 0), (30, 2.8, 1),
                                                              (40, 2.7, 1), (50, 2.6, 1))]
    # killed while writing iteration 60; resumed from the iteration-40 checkpoint (its hub: 1 skip); a skip streak
    # ends at iteration 80 with a rollback to the iteration-60 checkpoint (the count goes on), and the job is
    # still running: its iteration 80 is stale
    resumed = [train_row(i, loss, skipped=n) for i, loss, n in ((50, 2.5, 1), (60, 2.4, 2), (70, 5.0, 4),
                                                                (80, 9.0, 6), (70, 2.3, 6))]
    d = tmp_path / 'run' / '20260101_000000' / 'vis_data'
    d.mkdir(parents=True)
    lines = [json.dumps(r) for r in first] + ['{"loss": 1.0, "st' + json.dumps(resumed[0])]
    (d / 'scalars.json').write_text('\n'.join(lines + [json.dumps(r) for r in resumed[1:]]) + '\n')
    with pytest.warns(UserWarning, match='kept the row appended'):
        run = compare.load_run(str(tmp_path / 'run'))
    steps, loss = run['loss']
    assert steps.tolist() == [10, 20, 30, 40, 50, 60, 70]
    np.testing.assert_allclose(loss, [3.0, 2.9, 2.8, 2.7, 2.5, 2.4, 2.3])
    np.testing.assert_allclose(compare.skipped_steps(run)[1], [0, 0, 1, 1, 1, 2, 6])


def test_logged_skip_counts_of_a_guarded_run_resumed_into_its_folder(tmp_path):
    """The real guard, mmengine's LogProcessor (window 10) and LocalVisBackend, and ResumableRunner: logging
    every 3 iterations, compare_runs reads the exact number of skipped updates at every logged iteration."""
    from projects.vim_disc.engine.optim_wrapper import SKIPPED_STEPS, SKIPS_TOTAL, GuardedOptimWrapper
    from projects.vim_disc.engine.sampler import ResumableRunner
    from tests.engine.toy_runner import toy_runner

    def train(max_iters, bad, **kwargs):
        optim_wrapper = dict(type=GuardedOptimWrapper, optimizer=dict(type='SGD', lr=0.1),
                             inject_nonfinite=dict(loss_iters=bad))
        runner = toy_runner(tmp_path, max_iters=max_iters, ckpt_interval=3, log_interval=3, runner_cls=ResumableRunner,
                            optim_wrapper=optim_wrapper, **kwargs)
        runner.train()
        return runner

    # runner.iter 0, 4, 5 (logged steps 1, 5, 6) are skipped; a flag logged at steps 3 and 6 would read 0, 1
    first = train(6, bad=[0, 4, 5])
    assert first.message_hub.get_scalar(SKIPPED_STEPS).current() == first.message_hub.get_info(SKIPS_TOTAL) == 3
    # resume from the iteration-3 checkpoint (1 skip so far): steps 4-6 re-run without skips, one skip at 8
    second = train(9, bad=[7], resume=True, load_from=str(tmp_path / 'iter_3.pth'))
    assert second.message_hub.get_scalar(SKIPPED_STEPS).current() == second.message_hub.get_info(SKIPS_TOTAL) == 2
    assert len(compare.find_segments(str(tmp_path))) == 1
    steps, skipped = compare.skipped_steps(compare.load_run(str(tmp_path)))
    assert steps.tolist() == [3, 6, 9] and skipped.tolist() == [1, 1, 2]


def test_a_fresh_launch_in_the_same_dir_supersedes_the_old_one(tmp_path):
    write_segment(tmp_path / 'r', '20260101_000000', [train_row(i, 3.0) for i in (10, 20, 30)])
    write_segment(tmp_path / 'r', '20260101_050000', [train_row(i, 1.0) for i in (10, 20)])
    steps, loss = compare.load_run(str(tmp_path / 'r'))['loss']
    assert steps.tolist() == [10, 20] and loss.tolist() == [1.0, 1.0]


def test_compare_figure_and_table(runs_dir, tmp_path):
    with pytest.warns(UserWarning):
        runs = {name: compare.load_run(str(runs_dir / name)) for name in ('zoh', 'rk4', 'foh')}
    out = tmp_path / 'cmp.png'
    fig, drawn = compare.plot_runs(runs, out=str(out))
    assert_png(out, (800, 400))
    assert list(drawn)[:3] == ['loss', 'loss_rpn_cls', 's0.loss_mask']
    assert 's0.acc' not in drawn and 'loss_scale' not in drawn
    assert {'grad_norm', 'skipped updates (cumulative)', 'coco/bbox_mAP', 'coco/segm_mAP'} <= set(drawn)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == list(drawn)
    for panel in ('loss', 'grad_norm'):
        assert set(drawn[panel]) == {'zoh', 'rk4', 'foh'}
        for name, (x, y) in drawn[panel].items():
            np.testing.assert_array_equal(x, runs[name][panel][0])
            np.testing.assert_allclose(y, runs[name][panel][1])
    ax_loss = fig.axes[titles.index('loss')]
    assert sorted(line.get_label() for line in ax_loss.get_lines()) == ['foh', 'rk4', 'zoh']
    # skipped: zoh and rk4 log running counts; foh's flag is not a count and draws nothing
    assert set(drawn['skipped updates (cumulative)']) == {'zoh', 'rk4'}
    np.testing.assert_allclose(drawn['skipped updates (cumulative)']['rk4'][1], [0, 0, 1, 2])
    assert set(drawn['coco/segm_mAP']) == {'zoh', 'rk4'}
    assert drawn['coco/segm_mAP']['rk4'][0].tolist() == [40, 80]
    assert fig.axes[titles.index('grad_norm')].get_yscale() == 'log'

    table = compare.markdown_table(runs).splitlines()
    assert table[0].startswith('| run | iterations | loss |')
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]] for line in table[2:]}
    assert rows['zoh'] == ['80', '1.5200', '0.125', '3', '0.200', '0.150', '0.200 (80)']
    assert rows['rk4'] == ['80', '1.5000', '0.125', '2', '0.250', '0.200', '0.300 (40)']
    assert rows['foh'] == ['20', '1.8000', '0.5', '-', '-', '-', '-']


def test_compare_runs_cli(runs_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out' / 'cmp.png'
    monkeypatch.setattr(sys, 'argv', ['compare_runs.py', str(runs_dir / 'rk4'), str(runs_dir / 'foh'),
                                      '--out', str(out), '--smooth', '2', '--dpi', '50'])
    compare.main()
    assert_png(out)
    table = (tmp_path / 'out' / 'cmp.md').read_text()
    assert '| rk4 | 80 |' in table and '| foh | 20 |' in table
    assert table in capsys.readouterr().out
    monkeypatch.setattr(sys, 'argv', ['compare_runs.py', str(tmp_path / 'missing'), '--out', str(out)])
    with pytest.raises(FileNotFoundError):
        compare.main()


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(compare.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    np.testing.assert_allclose(compare.smooth(np.array([1.0, 3.0]), 1), [1, 3])


# ----------------------------------------------------------------------------------------------------
# browse_dataset
# ----------------------------------------------------------------------------------------------------
LSJ_SIZE = 96


@pytest.fixture(scope='module')
def lsj_demo_cfg(tmp_path_factory):
    """The demo config on a 6-image shapes dataset, with the COCO LSJ pipeline at 96 px."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'demo', 'vim_demo.py'))
    browse_tool.use_train_pipeline_of(cfg, osp.join(ROOT, 'configs', '_base_', 'datasets', 'coco_lsj.py'))
    for t in cfg.train_dataloader.dataset.pipeline:
        if t['type'] == 'RandomResize':
            t['scale'] = (LSJ_SIZE, LSJ_SIZE)
        elif t['type'] == 'PolygonRandomCrop':
            t['crop_size'] = (LSJ_SIZE, LSJ_SIZE)
        elif t['type'] == 'Pad':
            t['size'] = (LSJ_SIZE, LSJ_SIZE)
    root = str(tmp_path_factory.mktemp('shapes') / 'shapes')
    cfg.train_dataloader.dataset.update(data_root=root, num_train=6, num_val=2)
    return cfg


def test_browse_draws_the_lsj_pipeline_output(lsj_demo_cfg, tmp_path):
    types = [t['type'] for t in lsj_demo_cfg.train_dataloader.dataset.pipeline]
    assert 'PolygonRandomCrop' in types and 'RandomResize' in types
    drawn = browse_tool.browse(lsj_demo_cfg, str(tmp_path / 'vis'), num=6, seed=1)
    assert len(drawn) == 6
    assert sum(len(d['boxes']) for d in drawn) > 0
    recoloured = 0
    for d in drawn:
        size = assert_png(d['path'], (LSJ_SIZE, LSJ_SIZE))
        assert size == (LSJ_SIZE, LSJ_SIZE)  # what the pipeline produced (padded crop), not the source image
        assert d['image'].shape == (LSJ_SIZE, LSJ_SIZE, 3)
        assert len(d['boxes']) == len(d['masks']) == len(d['labels'])
        out = np.asarray(Image.open(d['path']).convert('RGB')).astype(int)
        changed = np.abs(out - d['image'].astype(int)).sum(-1) > 30
        near_boxes = np.zeros(changed.shape, bool)
        for (x1, y1, x2, y2), mask in zip(d['boxes'], d['masks']):
            assert mask.shape == (LSJ_SIZE, LSJ_SIZE)
            # the polygon crop keeps every mask inside its recomputed box
            ys, xs = np.nonzero(mask)
            if len(xs):
                assert xs.min() >= math.floor(x1) - 1 and xs.max() <= math.ceil(x2) + 1
                assert ys.min() >= math.floor(y1) - 1 and ys.max() <= math.ceil(y2) + 1
            if mask.sum() >= 20:  # the mask overlay recolours the instance
                assert changed[mask].mean() > 0.5
                recoloured += 1
            near_boxes[max(int(y1) - 4, 0):int(y2) + 5, max(int(x1) - 4, 0):int(x2) + 5] = True
        if not d['boxes'].size:
            assert not changed.any()  # nothing to draw: the image is saved as the pipeline produced it
        # label texts may overhang a box a little; everything else away from the boxes is untouched
        assert changed[~near_boxes].mean() < 0.1
    assert recoloured > 0


def test_browse_cli_writes_images_and_montage(lsj_demo_cfg, tmp_path, monkeypatch):
    cfg_path = tmp_path / 'cfg.py'
    lsj_demo_cfg.dump(str(cfg_path))
    monkeypatch.setattr(sys, 'argv', ['browse_dataset.py', str(cfg_path), '--output-dir', str(tmp_path / 'vis'),
                                      '--num', '3', '--montage', str(tmp_path / 'montage.png'),
                                      '--montage-cols', '2', '--montage-tile', '64'])
    browse_tool.main()
    files = sorted(os.listdir(tmp_path / 'vis'))
    assert len(files) == 3 and files[0].startswith('0000_')
    assert_png(tmp_path / 'montage.png', (2 * 64, 2 * 64))


# ----------------------------------------------------------------------------------------------------
# get_flops
# ----------------------------------------------------------------------------------------------------
def test_mixer_flops_match_a_hand_count():
    # 3 tokens, d_model 2, d_inner 4, d_state 2, dt_rank 1, d_conv 2, foh (52 FLOPs of coefficients, K = 1)
    parts = flops.mixer_flops(tokens=3, d_model=2, d_inner=4, d_state=2, dt_rank=1, d_conv=2, coef=52, history=1)
    in_proj = 3 * 2 * 8 * 2          # 3 tokens x (2 -> 8) MACs, 2 FLOPs each
    x_proj = 2 * (3 * 4 * 5 * 2)     # two directions x 3 tokens x (4 -> 1 + 2 + 2)
    dt_proj = 2 * (3 * 1 * 4 * 2)    # two directions x 3 tokens x (1 -> 4)
    out_proj = 3 * 8 * 2 * 2         # 3 tokens x (both directions' 2 x 4 -> 2): the mean is folded in
    assert parts['projections'] == in_proj + x_proj + dt_proj + out_proj == 480
    assert parts['conv1d'] == 2 * (4 * 4 * 2 * 2) == 128  # 3 + 1 padded outputs x 4 channels x 2 taps
    elements = 2 * 3 * 4 * 2         # directions x L x D x N
    assert parts['scan_coef'] == elements * 52
    # v = B u (1); w_0 v_t + w_1 v_{t-1} (3); times delta (1)
    assert parts['scan_input'] == elements * 5
    # z = delta a (1); Abar h + input (2); C h summed over N (2)
    assert parts['scan_recurrence'] == elements * 5
    assert parts['elementwise'] == 2 * 3 * 4 * 16 + 3 * 2 * 5
    assert parts['total'] == 480 + 128 + 48 * 52 + 48 * 5 + 48 * 5 + 414 == 3998


def test_every_rule_has_a_coefficient_cost_and_history_prices_the_input_term():
    from kernels.discretization import RULES, ZOH
    assert set(flops.COEFF_FLOPS) == set(RULES)
    for name, cls in RULES.items():
        coef, per_input, _ = flops.scan_flops_per_element(flops.coeff_flops(name), cls.history)
        assert coef == flops.COEFF_FLOPS[name] and per_input == 2 * cls.history + 3

    class Declared(ZOH):
        name = 'declared'
        coeff_flops = 7

    class Undeclared(ZOH):
        name = 'undeclared'

    assert flops.coeff_flops(Declared()) == 7
    with pytest.raises(KeyError, match='coeff_flops'):
        flops.coeff_flops(Undeclared())


def test_analytic_projection_flops_equal_torch_flop_counter(monkeypatch):
    """With the scan replaced by the identity, every remaining FLOP is a matmul or conv torch can count."""
    from torch.utils.flop_counter import FlopCounterMode

    from projects.vim_disc.models import vim
    monkeypatch.setattr(vim, 'bidirectional_selective_scan', lambda u, *args, **kwargs: u)
    backbone = vim.VimBackbone(arch=dict(embed_dims=24, depth=2), img_size=48, patch_size=16,
                               ssm_cfg=dict(d_state=5, d_conv=3), discretization='poly').eval()
    height, width = 48, 80  # 3 x 5 tokens
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone(torch.randn(2, 3, height, width))
    report = flops.backbone_flops(backbone, height, width, batch=2)
    assert report['tokens'] == 15 and report['rule'] == 'poly'
    traced = report['stem']['patch_embed'] + sum(lr['projections'] + lr['conv1d'] for lr in report['layers'])
    assert counter.get_total_flops() == traced


def test_get_flops_cli_on_the_demo_config(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'flops.json'
    monkeypatch.setattr(sys, 'argv', ['get_flops.py', osp.join(ROOT, 'configs', 'demo', 'vim_demo.py'),
                                      '--shape', '160', '--json', str(out),
                                      '--cfg-options', 'model.backbone.arch.depth=2'])
    flops.main()
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result['shape'] == [160, 160] and result['report']['tokens'] == 100
    assert len(result['report']['layers']) == 2 and result['report']['rule'] == 'zoh'
    scans = {k: v['scan'] for k, v in result['rules'].items()}
    assert sorted(scans, key=scans.get) == ['zoh', 'bilinear', 'rk4', 'foh', 'poly', 'highorder']
    # the demo backbone cut to 2 layers: 128 wide, d_inner 256, d_state 16, 100 tokens, 2 directions
    elements = 2 * 2 * 100 * 256 * 16
    assert result['rules']['zoh']['scan'] == elements * (1 + 3 + 5)
    assert result['rules']['highorder']['scan'] == elements * (79 + 9 + 5)
    assert result['params']['backbone'] > result['params']['per_layer'] * 2
    assert f"| zoh | 0 | 1 | {elements * 9 / 1e9:.3f} |" in printed

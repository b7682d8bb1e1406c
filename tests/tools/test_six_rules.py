"""The six rules on one GPU (issue 13), on the CPU: the configs/shapes1024 family against the COCO rule configs it
inherits, the runner's pieces (schedule stretch, stress lr, device adaptation, the facts read from a Runner, the
report and its picture) and tools/analysis/six_rules_gpu.py end to end at a tiny size."""
import glob
import json
import math
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image

from kernels.discretization import get_discretizer
from projects.vim_disc.datasets.shapes import ShapesDataset
from projects.vim_disc.engine.hooks import NonFiniteRollbackHook, NonFiniteTrainingError, SSMStatsHook
from projects.vim_disc.engine.optim_wrapper import GuardedOptimWrapper
from tests.engine.toy_runner import ToySSMModel, toy_runner
from tests.tools.test_train import ROOT, run_tool

sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
import six_rules  # noqa: E402

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# the top-level keys the family may change (the rest of the COCO config is inherited as it is)
CHANGED = {'model', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'val_evaluator', 'test_evaluator',
           'train_cfg', 'param_scheduler', 'optim_wrapper', 'default_hooks', 'log_processor'}


def load_pair(rule):
    shapes = Config.fromfile(osp.join(ROOT, 'configs', 'shapes1024', f'vim_{rule}.py'))
    coco = Config.fromfile(osp.join(ROOT, 'configs', f'vim_{rule}.py'))
    return shapes, coco


def test_one_config_per_rule():
    names = sorted(osp.basename(p) for p in glob.glob(osp.join(ROOT, 'configs', 'shapes1024', 'vim_*.py')))
    assert names == sorted(f'vim_{rule}.py' for rule in six_rules.RULES)


def test_rule_files_differ_only_in_their_rule():
    def body(rule):  # from the _base_ line on, the rule's name blanked
        with open(osp.join(ROOT, 'configs', 'shapes1024', f'vim_{rule}.py')) as f:
            text = f.read()
        return text[text.index('_base_ = '):].replace(f'vim_{rule}.py', 'vim_RULE.py')

    assert len({body(rule) for rule in six_rules.RULES}) == 1
    assert "_base_ = ['../vim_RULE.py', './_base_.py']" in body('zoh')


@pytest.mark.parametrize('rule', six_rules.RULES)
def test_inherits_the_rule_and_the_recipe_unchanged(rule):
    shapes, coco = load_pair(rule)
    backbone, coco_backbone = shapes.model.backbone, coco.model.backbone
    assert backbone.discretization == coco_backbone.discretization == rule
    assert backbone.ssm_cfg == coco_backbone.ssm_cfg
    assert shapes.optim_wrapper.clip_grad == coco.optim_wrapper.clip_grad
    # the guard, layer-wise lr decay and AdamW of the recipe; bf16 autocast as the issue asks
    for key in ('type', 'constructor', 'paramwise_cfg', 'loss_scale'):
        assert shapes.optim_wrapper[key] == coco.optim_wrapper[key], key
    assert shapes.optim_wrapper.dtype == 'bfloat16'
    assert {k: v for k, v in shapes.optim_wrapper.optimizer.items() if k != 'lr'} == {
        k: v for k, v in coco.optim_wrapper.optimizer.items() if k != 'lr'}
    assert shapes.custom_hooks == coco.custom_hooks  # guard rollback, SSM statistics, preemption, RNG state
    for key in ('runner_type', 'default_scope', 'custom_imports', 'env_cfg', 'auto_scale_lr', 'val_cfg', 'test_cfg'):
        assert shapes[key] == coco[key], key
    assert shapes.train_cfg.type == coco.train_cfg.type
    # nothing of the recipe is dropped, and only the keys the family is about change
    coco_dict, shapes_dict = coco.to_dict(), shapes.to_dict()
    assert set(coco_dict) <= set(shapes_dict)
    assert {k for k in coco_dict if coco_dict[k] != shapes_dict[k]} <= CHANGED


@pytest.mark.parametrize('rule', six_rules.RULES)
def test_the_model_differs_only_in_weights_and_classes(rule):
    shapes, coco = load_pair(rule)
    num_classes = len(ShapesDataset.METAINFO['classes'])
    model = shapes.model.to_dict()
    assert model['backbone'].pop('init_cfg') is None  # from scratch: no ImageNet weights on the card
    assert [h.pop('num_classes') for h in model['roi_head']['bbox_head']] == [num_classes] * 3
    assert model['roi_head']['mask_head'].pop('num_classes') == num_classes
    expected = coco.model.to_dict()
    expected['backbone'].pop('init_cfg')
    for head in expected['roi_head']['bbox_head'] + [expected['roi_head']['mask_head']]:
        head.pop('num_classes')
    assert model == expected
    assert model['data_preprocessor']['batch_augments'] == [
        dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)]


@pytest.mark.parametrize('rule', six_rules.RULES)
def test_shapes_data_through_the_lsj_pipeline_with_the_polygon_crop(rule):
    shapes, coco = load_pair(rule)
    assert shapes.train_dataloader.dataset.pipeline == coco.train_dataloader.dataset.pipeline
    for split in ('val_dataloader', 'test_dataloader'):
        assert shapes[split].dataset.pipeline == coco[split].dataset.pipeline
    pipeline = {t['type']: t for t in shapes.train_dataloader.dataset.pipeline}
    assert pipeline['LoadAnnotations']['poly2mask'] is False
    crop = pipeline['PolygonRandomCrop']
    assert (crop['crop_type'], crop['crop_size'], crop['allow_negative_crop']) == ('absolute_range', (1024, 1024), True)
    assert pipeline['RandomResize']['scale'] == (1024, 1024) and pipeline['RandomResize']['ratio_range'] == (0.1, 2.0)

    generator = ('seed', 'num_train', 'num_val', 'min_size', 'max_size')
    datasets = {s: shapes[s].dataset for s in ('train_dataloader', 'val_dataloader', 'test_dataloader')}
    for split, ds in datasets.items():
        assert ds.type == 'ShapesDataset', split
        # one marker for both splits: the generator arguments must agree, or each split rebuilds the other's files
        assert {k: ds[k] for k in generator} == {k: datasets['train_dataloader'][k] for k in generator}
        assert ds.data_root == datasets['train_dataloader'].data_root
    # images at COCO-like sizes up to the LSJ target
    assert datasets['train_dataloader'].max_size == 1024 and datasets['train_dataloader'].min_size >= 512
    assert datasets['train_dataloader'].ann_file == 'annotations/instances_train.json'
    assert datasets['val_dataloader'].ann_file == 'annotations/instances_val.json'
    for evaluator in ('val_evaluator', 'test_evaluator'):
        assert shapes[evaluator].ann_file == datasets['val_dataloader'].data_root + 'annotations/instances_val.json'
        assert shapes[evaluator].metric == ['bbox', 'segm']


@pytest.mark.parametrize('rule', six_rules.RULES)
def test_lr_is_the_recipes_per_update(rule):
    # not scaled down for the smaller batch (configs/shapes1024/_base_.py says why); bf16 autocast
    shapes, coco = load_pair(rule)
    assert shapes.train_dataloader.batch_size < coco.auto_scale_lr.base_batch_size
    assert shapes.optim_wrapper.optimizer.lr == coco.optim_wrapper.optimizer.lr == 1e-4
    assert shapes.optim_wrapper.dtype == 'bfloat16' and shapes.optim_wrapper.type == coco.optim_wrapper.type
    assert shapes.optim_wrapper.clip_grad == coco.optim_wrapper.clip_grad


@pytest.mark.parametrize('rule', six_rules.RULES)
def test_schedule_is_the_recipe_shortened(rule):
    shapes, coco = load_pair(rule)
    iters = shapes.train_cfg.max_iters
    assert 200 <= iters <= 1000 and shapes.train_cfg.val_interval == iters
    warmup, steps = shapes.param_scheduler
    coco_warmup, coco_steps = coco.param_scheduler
    assert (warmup.type, warmup.start_factor, steps.type, steps.gamma) == (
        coco_warmup.type, coco_warmup.start_factor, coco_steps.type, coco_steps.gamma)
    assert 0 < warmup.end < iters and steps.end == iters
    # the 10x drops at the recipe's fractions of the run
    for ours, theirs in zip(steps.milestones, coco_steps.milestones):
        assert abs(ours / iters - theirs / coco.train_cfg.max_iters) < 1.5 / iters
    # checkpoints inside the run: what NonFiniteRollbackHook rolls back to
    assert shapes.default_hooks.checkpoint.interval < iters


def test_rescale_schedule_keeps_every_fraction():
    cfg = Config.fromfile(osp.join(ROOT, six_rules.CONFIG.format('zoh')))
    old = cfg.train_cfg.max_iters
    warmup, milestones = cfg.param_scheduler[0].end, cfg.param_scheduler[1].milestones
    interval = cfg.default_hooks.checkpoint.interval
    six_rules.rescale_schedule(cfg, old // 2)
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == cfg.param_scheduler[1].end == old // 2
    assert cfg.param_scheduler[0].end == round(warmup / 2)
    assert cfg.param_scheduler[1].milestones == [round(m / 2) for m in milestones]
    assert cfg.default_hooks.checkpoint.interval == round(interval / 2)
    six_rules.rescale_schedule(cfg, 2)  # never 0, never beyond the run
    assert cfg.param_scheduler[0].end == 1 and cfg.param_scheduler[1].milestones == [2, 2]
    assert cfg.default_hooks.checkpoint.interval == 1
    cfg.param_scheduler[0].by_epoch = True
    with pytest.raises(ValueError, match='epoch-based'):
        six_rules.rescale_schedule(cfg, 10)


def test_prepare_config_for_a_stress_run_on_the_cpu(tmp_path):
    nominal, _ = six_rules.prepare_config('rk4', str(tmp_path), iters=40)
    assert nominal.optim_wrapper.type == 'GuardedAmpOptimWrapper' and nominal.train_cfg.max_iters == 40
    # options come after the stretch (they win), the stress factor multiplies whatever lr they set
    cfg, notes = six_rules.prepare_config('rk4', str(tmp_path), iters=40, lr_factor=six_rules.STRESS_LR_FACTOR,
                                          cfg_options={'optim_wrapper.optimizer.lr': 1e-5, 'train_cfg.val_interval': 7},
                                          device='cpu')
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(4e-5)
    assert cfg.train_cfg.val_interval == 7 and cfg.train_cfg.max_iters == 40
    assert cfg.optim_wrapper.type == 'GuardedOptimWrapper'
    assert not {'dtype', 'loss_scale'} & set(cfg.optim_wrapper)
    assert cfg.optim_wrapper.clip_grad == nominal.optim_wrapper.clip_grad
    assert cfg.model.backbone.cuda_graph is False and any('GuardedOptimWrapper' in n for n in notes)
    assert cfg.work_dir == str(tmp_path)
    facts = six_rules.config_facts(cfg)
    assert facts['lr'] == pytest.approx(4e-5) and facts['discretization'] == 'rk4'
    assert facts['image_size'] == [1024, 1024] and facts['stage_loss_weights'] == [1.0, 0.5, 0.25]
    assert 'TensorboardVisBackend' in [b['type'] for b in cfg.visualizer.vis_backends]  # installed here


def test_a_machine_without_tensorboard_logs_locally_only(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # import fails as if not installed
    cfg, notes = six_rules.prepare_config('zoh', str(tmp_path))
    assert [b['type'] for b in cfg.visualizer.vis_backends] == ['LocalVisBackend']
    assert any('TensorboardVisBackend dropped' in n for n in notes)


# ----------------------------------------------------------------------------------------------------
# Facts from a real Runner, the record, the report and its picture (a toy model: seconds)
# ----------------------------------------------------------------------------------------------------
def diverging_toy_run(work_dir):
    """NaN losses at iterations 5-7, from the model itself; after 3 in a row a rollback to iteration 4, which
    meets them again; the second streak ends the run (max_rollbacks=1). SSM statistics every iteration."""
    model = ToySSMModel(get_discretizer('rk4'), nan_iters=[5, 6, 7])
    runner = toy_runner(work_dir, max_iters=12, ckpt_interval=2, model=model, log_interval=1,
                        optim_wrapper=dict(type=GuardedOptimWrapper, optimizer=dict(type='SGD', lr=0.01)),
                        custom_hooks=[NonFiniteRollbackHook(max_consecutive_skips=3, max_rollbacks=1),
                                      SSMStatsHook(interval=1, print_table=False)])
    with pytest.raises(NonFiniteTrainingError) as err:
        runner.train()
    return runner, str(err.value)


def test_runner_facts_and_record_of_a_run_the_guard_stopped(tmp_path):
    runner, reason = diverging_toy_run(tmp_path)
    facts = six_rules.runner_facts(runner)
    # iterations 0-7, then 4-7 again after the rollback: 12 losses, 6 of them NaN, each one a skipped update
    assert facts['losses_seen'] == 12 and facts['nonfinite_losses'] == 6 and facts['iters_done'] == 7
    assert facts['skipped_updates'] == 6 and facts['rollbacks'] == 1 and facts['amp_overflows'] == 0
    assert facts['weights_finite'] is True and facts['nonfinite_parameters'] == []
    # read back from the text log: when, why, and where the rollback went
    assert [e['iter'] for e in facts['skip_events']] == [6, 7, 8, 6, 7, 8]
    assert {e['cause'] for e in facts['skip_events']} == {'loss and gradient'}
    assert facts['rollback_events'] == [dict(failed_iter=8, restored_iter=4, lr_scale=0.5)]
    assert facts['last_skip']['loss'] is None  # NaN, written as JSON null

    summary = dict(rule='rk4', status='stopped', stop_reason=reason, stage_loss_weights=[1.0, 0.5, 0.25], **facts)
    record = six_rules.rule_record(str(tmp_path), summary)
    json.dumps(record, allow_nan=False)  # strict JSON
    curves = record['curves']
    # compare_runs joined the rolled-back segment: the curve runs 1..8 once, the skip count goes on to 6
    assert curves['loss']['iter'] == list(range(1, 9))
    assert curves['nonfinite_skipped_steps']['value'] == [0, 0, 0, 0, 3, 4, 5, 6]
    # logged losses are window means: from the first NaN on, every window holds one (JSON null)
    assert all(math.isfinite(v) for v in curves['loss']['value'][:4]) and curves['loss']['value'][4:] == [None] * 4
    # SSM statistics every iteration, reduced over the two toy layers and both directions
    run = six_rules.compare_runs.load_run(str(tmp_path))
    keys = [k for k in run if k.startswith('ssm/') and k.endswith('/abar_max')]
    assert len(keys) == 4
    step = curves['ssm_abar_max']['iter'][0]
    expected = max(float(run[k][1][list(run[k][0]).index(step)]) for k in keys)
    assert curves['ssm_abar_max']['value'][0] == pytest.approx(expected)
    assert record['ssm']['abar_max'] == pytest.approx(max(curves['ssm_abar_max']['value']))
    assert 0 < record['ssm']['abar_max'] <= 1 + 1e-6 and record['ssm']['delta_p99'] > 0
    assert record['s_per_iter'] > 0 and record['peak_mem_gib'] is None  # no CUDA here
    assert record['loss_mask_final'] == {'s0': None, 's1': None, 's2': None}  # the toy has no mask heads
    assert record['loss_mask_below_ln2'] is False


def test_report_merges_calls_and_draws_one_block_per_mode(tmp_path):
    runner, reason = diverging_toy_run(tmp_path / 'run')
    base = dict(status='stopped', stop_reason=reason, stage_loss_weights=[1.0, 0.5, 0.25],
                **six_rules.runner_facts(runner))
    record = six_rules.rule_record(str(tmp_path / 'run'), base)
    # masks as a Cascade Mask R-CNN logs them (stage-weighted): s2 ends above ln 2 once unweighted
    for stage, w, end in (('s0', 1.0, 0.2), ('s1', 0.5, 0.1), ('s2', 0.25, 0.18)):
        record['curves'][f'{stage}.loss_mask'] = dict(iter=[1, 2], value=[math.log(2) * w, end])
    reports = []
    for mode, rules in (('nominal', ['rk4', 'zoh']), ('nominal', ['foh']), ('stress', ['zoh'])):
        report = six_rules.new_report(dict(device='toy', command=mode))
        for rule in rules:
            six_rules.add_record(report, mode, rule, dict(record, status='finished', bbox_mAP=0.5), iters=12)
        if mode == 'stress':  # a rule the call had no time for: no curves at all
            six_rules.add_record(report, mode, 'rk4', dict(rule='rk4', status='not_run', stop_reason='no time'))
        path = tmp_path / f'{mode}_{len(reports)}.json'
        six_rules.write_json(report, str(path))
        reports.append(six_rules.load_json(str(path)))
    merged = six_rules.merge_reports(reports)
    assert list(merged['runs']) == ['nominal', 'stress']
    assert list(merged['runs']['nominal']['rules']) == ['zoh', 'foh', 'rk4']  # the order
    assert list(merged['runs']['stress']['rules']) == ['zoh', 'rk4']
    assert merged['runs']['stress']['lr_factor'] == six_rules.STRESS_LR_FACTOR
    assert [m['command'] for m in merged['merged_from']] == ['nominal', 'nominal', 'stress']
    # a stress call at another lr factor is another experiment: refused, not drawn as one block
    harder = six_rules.new_report(dict(device='toy', command='stress x20'))
    six_rules.add_record(harder, 'stress', 'foh', dict(record, status='finished'), iters=12, lr_factor=20.0)
    assert harder['runs']['stress']['lr_factor'] == 20.0
    with pytest.raises(ValueError, match='stress runs at 4.0x and 20.0x lr'):
        six_rules.merge_reports(reports + [harder])

    out = tmp_path / 'six.png'
    blocks = six_rules.plot_report(merged, str(out), dpi=40)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert len(blocks) == 2
    for titles in blocks:
        assert {'loss', 'grad_norm', 'skipped updates (cumulative)', 'coco/bbox_mAP', 'coco/segm_mAP',
                'max |Abar| (all layers)', 'delta p99 (max over layers)'} <= set(titles)
        assert {'s0.loss_mask', 's1.loss_mask', 's2.loss_mask'} <= set(titles)
    fig, axes = six_rules.plot_mode('nominal', merged['runs']['nominal'], dpi=40)
    # the "learnt nothing" line of each stage at ln 2 times the stage's loss weight
    for stage, w in (('s0', 1.0), ('s1', 0.5), ('s2', 0.25)):
        ref = [line for line in axes[f'{stage}.loss_mask'].get_lines() if line.get_linestyle() == '--']
        assert ref and ref[0].get_ydata()[0] == pytest.approx(math.log(2) * w)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 3 and labels[0].startswith('zoh, mAP 0.500/') and 'skipped 6, rollbacks 1' in labels[0]
    stress_fig, _ = six_rules.plot_mode('stress', merged['runs']['stress'], dpi=40)
    assert [t.get_text() for t in stress_fig.legends[0].get_texts()][1].startswith('rk4 [not_run], mAP -/-')
    with Image.open(out) as im:
        single = six_rules.plot_report(dict(runs={'stress': merged['runs']['stress']}), str(tmp_path / 'one.png'),
                                       dpi=40)
        with Image.open(tmp_path / 'one.png') as one:
            assert im.height > one.height and len(single) == 1
    # a block whose rules logged nothing still draws every panel (the SSM ones in cells of their own)
    empty = dict(runs={'stress': dict(lr_factor=4.0, rules={'rk4': dict(rule='rk4', status='not_run')})})
    (titles, ) = six_rules.plot_report(empty, str(tmp_path / 'empty.png'), dpi=40)
    assert {'grad_norm', 'max |Abar| (all layers)', 'delta p99 (max over layers)'} <= set(titles)


# ----------------------------------------------------------------------------------------------------
# The script and the runner end to end
# ----------------------------------------------------------------------------------------------------
def test_device_script_parses_and_refuses_an_unknown_part(tmp_path):
    script = osp.join(ROOT, 'scripts', 'gpu_six_rules.sh')
    assert subprocess.run(['bash', '-n', script]).returncode == 0
    proc = subprocess.run(['bash', script, str(tmp_path / 'out')], env={**os.environ, 'PART': 'bogus'},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and 'PART must be nominal or stress' in proc.stderr
    assert os.listdir(tmp_path / 'out') == []  # nothing installed, nothing run


TINY_SIZE = 128
TINY_HEADS = 64


def tiny_options(data_root):
    """A 2-layer Vim and 64-channel heads at 128 px on 8 + 2 generated images: seconds per iteration on 2 cores."""
    s = f'({TINY_SIZE},{TINY_SIZE})'
    options = [
        'model.backbone.arch.depth=2', f'model.backbone.img_size={TINY_SIZE}',
        f'model.data_preprocessor.batch_augments.0.size={s}',
        # RandomResize, PolygonRandomCrop, Pad of the LSJ pipeline; Resize, Pad of the test pipeline
        f'train_dataloader.dataset.pipeline.4.scale={s}', f'train_dataloader.dataset.pipeline.5.crop_size={s}',
        f'train_dataloader.dataset.pipeline.7.size={s}',
        f'model.neck.out_channels={TINY_HEADS}', f'model.rpn_head.in_channels={TINY_HEADS}',
        f'model.rpn_head.feat_channels={TINY_HEADS}', f'model.roi_head.bbox_roi_extractor.out_channels={TINY_HEADS}',
        f'model.roi_head.mask_roi_extractor.out_channels={TINY_HEADS}',
        f'model.roi_head.mask_head.in_channels={TINY_HEADS}',
        f'model.roi_head.mask_head.conv_out_channels={TINY_HEADS}',
        'model.train_cfg.rpn_proposal.nms_pre=200', 'model.train_cfg.rpn_proposal.max_per_img=50',
        'model.test_cfg.rpn.nms_pre=200', 'model.test_cfg.rpn.max_per_img=50', 'model.test_cfg.rcnn.max_per_img=20',
        'default_hooks.logger.interval=1', 'custom_hooks.3.interval=1',  # every iteration logged, with SSM stats
        # no 0.3 GB checkpoint of the tiny model per iteration on the CPU test machine
        'default_hooks.checkpoint.interval=100000', 'default_hooks.checkpoint.save_last=False',
        f'val_evaluator.ann_file={data_root}/annotations/instances_val.json',
        f'test_evaluator.ann_file={data_root}/annotations/instances_val.json',
    ]
    for stage in range(3):
        options += [f'model.roi_head.bbox_head.{stage}.in_channels={TINY_HEADS}',
                    f'model.roi_head.bbox_head.{stage}.conv_out_channels={TINY_HEADS}',
                    f'model.roi_head.bbox_head.{stage}.fc_out_channels={2 * TINY_HEADS}',
                    f'model.train_cfg.rcnn.{stage}.sampler.num=16']
    for split in ('train', 'val', 'test'):
        options += [f'{split}_dataloader.num_workers=0', f'{split}_dataloader.persistent_workers=False',
                    f'{split}_dataloader.dataset.data_root={data_root}/', f'{split}_dataloader.dataset.num_train=8',
                    f'{split}_dataloader.dataset.num_val=2', f'{split}_dataloader.dataset.min_size=96',
                    f'{split}_dataloader.dataset.max_size={TINY_SIZE}']
    for split in ('val', 'test'):
        options += [f'{split}_dataloader.batch_size=2', f'{split}_dataloader.dataset.pipeline.1.scale={s}',
                    f'{split}_dataloader.dataset.pipeline.2.size={s}']
    return options


# every field of a rule's record, and the curves the picture draws
RECORD_FIELDS = {
    'rule', 'mode', 'config', 'status', 'stop_reason', 'device', 'lr', 'batch_size', 'image_size', 'iters_planned',
    'iters_done', 'precision', 'clip_grad', 'ssm_cfg', 'discretization', 'stage_loss_weights', 'loss_final',
    'loss_mask_final', 'loss_mask_final_unweighted', 'loss_mask_below_ln2', 'grad_norm_final', 'nonfinite_losses',
    'skipped_updates', 'amp_overflows', 'rollbacks', 'skip_events', 'rollback_events', 'weights_finite',
    'bbox_mAP', 'segm_mAP', 's_per_iter', 'peak_mem_gib', 'wall_s', 'ssm', 'curves'}
CURVES = {'loss', 's0.loss_mask', 's1.loss_mask', 's2.loss_mask', 'grad_norm', 'nonfinite_skipped_steps',
          'coco/bbox_mAP', 'coco/segm_mAP', 'ssm_abar_max', 'ssm_delta_p99'}


# ~1 min on 2 idle cores: 3 trainings of 2 iterations (zoh and rk4 nominal, zoh stress) + 3 evaluations
@pytest.mark.slow
def test_runner_trains_two_rules_then_a_stopped_stress_run_and_merges(tmp_path):
    tool = [sys.executable, 'tools/analysis/six_rules_gpu.py', '--device', 'cpu', '--iters', '2', '--dpi', '40',
            '--work-dir', str(tmp_path / 'work')]
    options = tiny_options(tmp_path / 'data')
    nominal = tmp_path / 'nominal.json'
    proc = run_tool(tool + ['--rules', 'zoh', 'rk4', '--out-json', str(nominal), '--cfg-options', *options])
    report = json.loads(nominal.read_text())
    assert report['device'] == 'cpu' and report['git_commit'] is not None
    rules = report['runs']['nominal']['rules']
    assert list(rules) == ['zoh', 'rk4'] and report['runs']['nominal']['lr_factor'] == 1.0
    config_lr = Config.fromfile(osp.join(ROOT, six_rules.CONFIG.format('zoh'))).optim_wrapper.optimizer.lr
    for rule, r in rules.items():
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert CURVES <= set(r['curves']), CURVES - set(r['curves'])
        assert (r['status'], r['discretization'], r['iters_done'], r['iters_planned']) == ('finished', rule, 2, 2)
        assert r['lr'] == pytest.approx(config_lr) and r['image_size'] == [TINY_SIZE, TINY_SIZE]
        assert r['precision'] == 'float32'  # the CPU's plain guarded wrapper
        assert (r['nonfinite_losses'], r['skipped_updates'], r['rollbacks']) == (0, 0, 0)
        assert r['weights_finite'] is True and r['skip_events'] == [] and r['rollback_events'] == []
        assert r['curves']['loss']['iter'] == [1, 2] and all(np.isfinite(r['curves']['loss']['value']))
        assert set(r['loss_mask_final']) == {'s0', 's1', 's2'} and None not in r['loss_mask_final'].values()
        assert 0 <= r['bbox_mAP'] <= 1 and 0 <= r['segm_mAP'] <= 1
        assert r['s_per_iter'] > 0 and r['ssm']['stats_iters'] == [1, 2] and 0 < r['ssm']['abar_max'] <= 1 + 1e-6
    # the two rules ran their own discretization: different SSM statistics from one seed and one data stream
    assert rules['zoh']['ssm']['abar_max'] != rules['rk4']['ssm']['abar_max']
    assert nominal.with_suffix('.png').read_bytes()[:8] == PNG_MAGIC
    assert '[zoh]' in proc.stdout and '[rk4]' in proc.stdout  # each child's lines, attributed

    again = run_tool(tool + ['--rules', 'zoh', '--out-json', str(tmp_path / 'again.json'), '--cfg-options', *options])
    assert 'zoh (nominal): done already' in again.stdout  # a finished rule is not trained twice

    # 8x lr and a NaN loss at both iterations: the guard skips both and, allowed no rollback, stops the run; the
    # weights it kept are still evaluated
    stress = tmp_path / 'stress.json'
    proc = run_tool(tool + ['--rules', 'zoh', '--stress', '--stress-factor', '8', '--out-json', str(stress),
                            '--cfg-options', *options,
                            'optim_wrapper.inject_nonfinite.loss_iters=[0,1]', 'custom_hooks.2.max_consecutive_skips=2',
                            'custom_hooks.2.max_rollbacks=0'])
    stress_run = json.loads(stress.read_text())['runs']['stress']
    assert stress_run['lr_factor'] == 8
    r = stress_run['rules']['zoh']
    assert r['status'] == 'stopped' and 'training diverged at iter 2' in r['stop_reason']
    assert r['lr'] == pytest.approx(8 * config_lr)
    assert r['skipped_updates'] == 2 and [e['cause'] for e in r['skip_events']] == ['loss and gradient'] * 2
    assert r['nonfinite_losses'] == 0  # the injected NaN comes after the logged loss: counted apart, as it should
    assert r['weights_finite'] is True and r['bbox_mAP'] is not None and 'val_error' not in r
    assert 'stopped' in proc.stdout

    merged = tmp_path / 'six_rules.json'
    run_tool([sys.executable, 'tools/analysis/six_rules_gpu.py', '--merge', str(nominal), str(stress),
              '--out-json', str(merged), '--dpi', '40'])
    report = json.loads(merged.read_text())
    assert {m: list(run['rules']) for m, run in report['runs'].items()} == {'nominal': ['zoh', 'rk4'],
                                                                           'stress': ['zoh']}
    with Image.open(merged.with_suffix('.png')) as both, Image.open(nominal.with_suffix('.png')) as one:
        assert both.height > one.height

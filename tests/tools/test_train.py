"""End-to-end runs of tools/train.py, tools/test.py and tools/dist_train.sh on the demo config (CPU)."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = 'configs/demo/vim_demo.py'
# a few iterations, a tiny backbone, and evaluation on 4 val images keep each run well under a minute
SMALL = [
    'model.backbone.arch.depth=2', 'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
    'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
    'val_dataloader.persistent_workers=False', 'val_dataloader.dataset.indices=4', 'val_dataloader.batch_size=2',
    'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False', 'test_dataloader.dataset.indices=4',
    'default_hooks.logger.interval=1', 'randomness.deterministic=True'
]


def run_tool(args, timeout=900, check=True, env=None):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    env.pop('PYTHONPATH', None)  # the tools must find the repo by themselves
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return proc


def train(work_dir, iters, extra=(), resume=None, check=True):
    opts = SMALL + [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
                    'default_hooks.checkpoint.interval=2'] + list(extra)
    args = [sys.executable, 'tools/train.py', DEMO, '--work-dir', str(work_dir)]
    if resume is not None:
        args += ['--resume'] + ([resume] if resume != 'auto' else [])
    return run_tool(args + ['--cfg-options'] + opts, check=check)


def scalars(work_dir):
    rows = []
    for f in sorted(glob.glob(osp.join(str(work_dir), '*', 'vis_data', 'scalars.json'))):
        with open(f) as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


@pytest.mark.slow
def test_train_evaluate_and_resume(tmp_path):
    work = tmp_path / 'run'
    train(work, 4)
    assert (work / 'iter_4.pth').exists() and (work / 'iter_2.pth').exists()
    rows = scalars(work)
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    metrics = [r for r in rows if 'coco/bbox_mAP' in r]
    assert metrics and 'coco/segm_mAP' in metrics[-1]

    # resume from the latest checkpoint in the work dir and continue to iteration 6
    proc = train(work, 6, resume='auto')
    log = proc.stdout + proc.stderr
    assert 'resumed' in log.lower() and 'iter_4.pth' in log
    assert (work / 'iter_6.pth').exists()
    iters = [r['iter'] for r in scalars(work) if 'loss' in r]
    assert iters[-2:] == [5, 6]
    from projects.vim_disc.engine import load_checkpoint_safely
    ckpt = load_checkpoint_safely(str(work / 'iter_6.pth'), map_location='cpu')  # weights_only=True + allow-list
    assert ckpt['meta']['iter'] == 6

    # tools/test.py evaluates the checkpoint
    proc = run_tool([sys.executable, 'tools/test.py', DEMO, str(work / 'iter_6.pth'), '--work-dir',
                     str(tmp_path / 'test'), '--cfg-options'] + SMALL)
    assert 'coco/segm_mAP' in proc.stdout + proc.stderr


@pytest.mark.slow
def test_dist_train_two_gloo_processes(tmp_path):
    work = tmp_path / 'dist'
    env = {'PYTHON': sys.executable, 'PORT': '29517'}
    args = ['bash', 'tools/dist_train.sh', DEMO, '2', '--work-dir', str(work), '--cfg-options'] + SMALL + [
        'train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'env_cfg.dist_cfg.backend=gloo',
        'default_hooks.checkpoint.interval=2'
    ]
    proc = run_tool(args, env=env)
    log = proc.stdout + proc.stderr
    assert (work / 'iter_2.pth').exists(), log[-3000:]
    # mmengine's environment report: two processes in one gloo group
    assert 'Distributed training: True' in log and 'GPU number: 2' in log, log[-3000:]


@pytest.mark.parametrize('python', ['VIM_DISC_VENV', 'override', 'no venv'])
def test_dist_train_runs_the_venv_python_unless_told_otherwise(python, tmp_path):
    """No training: a stand-in interpreter records how tools/dist_train.sh calls it."""
    stub = '#!/bin/sh\necho "$0 $*" > "$RECORD"\n'
    for d in ('venv/bin', 'other/bin'):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / 'python').write_text(stub)
        (tmp_path / d / 'python').chmod(0o755)
    # PYTHON='' counts as unset (${PYTHON:-...}): the caller's own choice must not leak in
    env = {'RECORD': str(tmp_path / 'record'), 'VIM_DISC_VENV': str(tmp_path / 'venv'), 'PYTHON': ''}
    expected = tmp_path / 'venv/bin/python'
    if python == 'override':
        env['PYTHON'] = expected = tmp_path / 'other/bin/python'
    elif python == 'no venv':  # falls back to `python` on PATH
        env.update(VIM_DISC_VENV=str(tmp_path / 'absent'), PATH=f'{tmp_path / "other/bin"}:{os.environ["PATH"]}')
        expected = tmp_path / 'other/bin/python'
    run_tool(['bash', 'tools/dist_train.sh', DEMO, '2', '--amp'], env={k: str(v) for k, v in env.items()})
    argv = (tmp_path / 'record').read_text().split()
    assert argv[:3] == [str(expected), '-m', 'torch.distributed.run'] and '--nproc_per_node=2' in argv
    assert argv[-5:] == [osp.join(ROOT, 'tools/train.py'), DEMO, '--launcher', 'pytorch', '--amp']


@pytest.mark.parametrize('resume', ['explicit', 'auto'])
def test_corrupt_checkpoint_refused_before_touching_the_work_dir(resume, tmp_path):
    from tests.engine.test_checkpoint import _flip_a_weight_byte, _snapshot

    # a previous run's work dir: an older good checkpoint, its log dir, and a damaged latest checkpoint
    work = tmp_path / 'run'
    (work / '20260101_000000' / 'vis_data').mkdir(parents=True)
    (work / '20260101_000000' / '20260101_000000.log').write_text('iterations 1-4\n')
    checkpoint = dict(meta=dict(iter=4, epoch=0), state_dict={'w': torch.arange(4096.)})
    torch.save({**checkpoint, 'meta': dict(iter=2, epoch=0)}, work / 'iter_2.pth')
    torch.save(checkpoint, work / 'iter_4.pth')
    data = bytearray((work / 'iter_4.pth').read_bytes())
    # explicit: a truncated file (killed while copying); auto: one flipped weight byte, readable but for its CRC
    data = data[:len(data) // 2] if resume == 'explicit' else _flip_a_weight_byte(data)
    (work / 'iter_4.pth').write_bytes(bytes(data))
    (work / 'last_checkpoint').write_text(str(work / 'iter_4.pth'))
    before = _snapshot(work)

    proc = train(work, 6, resume=str(work / 'iter_4.pth') if resume == 'explicit' else 'auto', check=False)
    assert proc.returncode != 0
    assert f'CorruptCheckpointError: Checkpoint {work / "iter_4.pth"} is truncated or corrupt' in proc.stderr
    assert ('zip archive without its central directory' if resume == 'explicit' else 'CRC mismatch') in proc.stderr
    assert _snapshot(work) == before  # no new file or directory, every file byte-for-byte (and mtime) as it was


def test_missing_coco_names_the_path_and_the_demo(tmp_path):
    from mmengine.config import Config

    from projects.vim_disc.utils import COCO_OVERRIDES, check_data_exists
    cfg = Config(dict(train_dataloader=dict(dataset=dict(
        type='CocoDataset', data_root=str(tmp_path / 'coco') + '/', ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/')))))
    with pytest.raises(FileNotFoundError) as err:
        check_data_exists(cfg)
    msg = str(err.value)
    assert str(tmp_path / 'coco' / 'annotations' / 'instances_train2017.json') in msg
    assert f'--cfg-options {COCO_OVERRIDES}.' in msg and 'val_evaluator.ann_file=' in msg
    assert 'configs/demo/vim_demo.py' in msg


@pytest.mark.parametrize('form', ['dict', 'list', 'Evaluator'])
def test_missing_evaluator_annotations_relative_to_the_working_directory(form, tmp_path, monkeypatch):
    from mmengine.config import Config

    from projects.vim_disc.utils import check_data_exists
    monkeypatch.chdir(tmp_path)  # CocoMetric opens ann_file as given, i.e. relative to the working directory
    (tmp_path / 'coco' / 'images').mkdir(parents=True)
    (tmp_path / 'coco' / 'val.json').write_text('{}')
    metrics = [dict(type='CocoMetric', ann_file='coco/val.json'), dict(type='CocoMetric', ann_file='ann/val.json')]
    evaluator = {'dict': metrics[1], 'list': metrics, 'Evaluator': dict(type='Evaluator', metrics=metrics)}[form]
    cfg = Config(dict(val_dataloader=dict(dataset=dict(type='CocoDataset', data_root='coco/', ann_file='val.json',
                                                       data_prefix=dict(img='images/'))),
                      val_evaluator=evaluator))
    with pytest.raises(FileNotFoundError) as err:
        check_data_exists(cfg)
    assert str(err.value).startswith(f"val_evaluator: annotation file not found: expected "
                                     f"{str(tmp_path / 'ann' / 'val.json')!r}.")
    (tmp_path / 'ann').mkdir()
    (tmp_path / 'ann' / 'val.json').write_text('{}')
    check_data_exists(cfg)
    # no val_dataloader, no validation: its evaluator is never read
    check_data_exists(Config(dict(val_dataloader=None, val_evaluator=dict(type='CocoMetric', ann_file='none.json'))))


def test_the_demo_needs_no_data_on_disk(tmp_path):
    from mmengine.config import Config

    from projects.vim_disc.utils import check_data_exists
    # the shapes dataset writes its images and the annotations its evaluator reads when it is built
    cfg = Config.fromfile(osp.join(ROOT, DEMO))
    root = str(tmp_path / 'not_generated_yet') + '/'
    cfg.merge_from_dict({'train_dataloader.dataset.data_root': root, 'val_dataloader.dataset.data_root': root,
                         'test_dataloader.dataset.data_root': root,
                         'val_evaluator.ann_file': root + 'annotations/instances_val.json',
                         'test_evaluator.ann_file': root + 'annotations/instances_val.json'})
    check_data_exists(cfg)
    check_data_exists(cfg, splits=('test_dataloader', ))
    assert not osp.exists(root)


def test_missing_data_fails_before_touching_the_work_dir(tmp_path):
    from projects.vim_disc.utils import COCO_OVERRIDES
    work = tmp_path / 'never'
    proc = run_tool([sys.executable, 'tools/train.py', DEMO, '--work-dir', str(work), '--cfg-options',
                     'train_dataloader.dataset.type=CocoDataset',
                     f'train_dataloader.dataset.data_root={tmp_path}/nowhere/'], check=False, timeout=300)
    assert proc.returncode != 0
    assert 'nowhere/annotations/instances_train.json' in proc.stderr
    assert COCO_OVERRIDES in proc.stderr and 'configs/demo/vim_demo.py' in proc.stderr
    assert not work.exists()


def test_slurm_variables_win_over_ones_exported_from_the_submitting_shell(monkeypatch):
    """sbatch exports the submitting shell's environment: a RANK / WORLD_SIZE / LOCAL_RANK left there (a shell
    inside another distributed job, a test process) must not give two SLURM tasks the same rank."""
    from projects.vim_disc import utils
    slurm = dict(SLURM_PROCID='1', SLURM_NTASKS='2', SLURM_LOCALID='1', SLURM_NODELIST='node[3-4]')
    stale = dict(RANK='0', WORLD_SIZE='8', LOCAL_RANK='0', MASTER_PORT='29517')
    calls = []
    monkeypatch.setattr(utils.subprocess, 'check_output', lambda cmd, text: calls.append(cmd) or 'node3\nnode4\n')
    env = utils.slurm_dist_env({**stale, **slurm})
    assert env == dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_PORT='29517', MASTER_ADDR='node3')
    assert calls == [['scontrol', 'show', 'hostnames', 'node[3-4]']]
    # as mmengine's slurm launcher: the config's port first, then MASTER_PORT, then 29500; MASTER_ADDR kept if set
    assert utils.slurm_dist_env({**stale, **slurm, 'MASTER_ADDR': 'h'}, port=29600) == dict(
        RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_PORT='29600', MASTER_ADDR='h')
    no_local = {k: v for k, v in slurm.items() if k != 'SLURM_LOCALID'}
    assert utils.slurm_dist_env({**no_local, 'MASTER_ADDR': 'h'}) == dict(
        RANK='1', WORLD_SIZE='2', LOCAL_RANK='0', MASTER_PORT='29500', MASTER_ADDR='h')

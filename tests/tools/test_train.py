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


def test_missing_coco_names_the_path_and_the_demo(tmp_path):
    from mmengine.config import Config

    from projects.vim_disc.utils import check_data_exists
    cfg = Config(dict(train_dataloader=dict(dataset=dict(
        type='CocoDataset', data_root=str(tmp_path / 'coco') + '/', ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/')))))
    with pytest.raises(FileNotFoundError) as err:
        check_data_exists(cfg)
    msg = str(err.value)
    assert str(tmp_path / 'coco' / 'annotations' / 'instances_train2017.json') in msg
    assert 'configs/demo/vim_demo.py' in msg


def test_missing_data_fails_before_touching_the_work_dir(tmp_path):
    work = tmp_path / 'never'
    proc = run_tool([sys.executable, 'tools/train.py', DEMO, '--work-dir', str(work), '--cfg-options',
                     'train_dataloader.dataset.type=CocoDataset',
                     f'train_dataloader.dataset.data_root={tmp_path}/nowhere/'], check=False, timeout=300)
    assert proc.returncode != 0
    assert 'nowhere/annotations/instances_train.json' in proc.stderr
    assert 'configs/demo/vim_demo.py' in proc.stderr
    assert not work.exists()

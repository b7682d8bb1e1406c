"""Config preparation shared by the tools: train (AMP / LR scaling / resume) and test (show / TTA) switches and a
missing-data check."""
import os
import os.path as osp
import subprocess
from typing import Iterable

import torch

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

DEMO_CONFIG = 'configs/demo/vim_demo.py'
# every path the COCO recipe reads (docs/recipe.md "Data"): the evaluators read annotations on their own
COCO_OVERRIDES = ' '.join([
    *(f'{split}_dataloader.dataset.data_root=/path/to/coco/' for split in ('train', 'val', 'test')),
    *(f'{split}_evaluator.ann_file=/path/to/coco/annotations/instances_val2017.json' for split in ('val', 'test')),
])
# datasets that create their own data on first use: nothing to check on disk
SELF_GENERATING_DATASETS = ('ShapesDataset', )
# plain wrapper -> its AMP variant (--amp)
AMP_VARIANT = {'OptimWrapper': 'AmpOptimWrapper', 'GuardedOptimWrapper': 'GuardedAmpOptimWrapper'}


def add_common_args(parser) -> None:
    """Arguments tools/train.py and tools/test.py share (mmdet 3.x names)."""
    from mmengine.config import DictAction
    parser.add_argument('--work-dir', help='the dir to save logs, models and metrics')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_tool_config(args) -> Config:
    """The config of a tool run: file + --cfg-options + launcher + work dir (default work_dirs/<config name>)."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def prepare_train_cfg(cfg: Config, amp: bool = False, auto_scale_lr: bool = False, resume=None) -> None:
    """Apply tools/train.py's switches to ``cfg`` in place (mmdet 3.x semantics)."""
    if amp:
        wrapper = cfg.optim_wrapper
        wrapper_type = wrapper.get('type', 'OptimWrapper')
        if wrapper_type in AMP_VARIANT.values():
            print_log('AMP is already enabled in the config', logger='current')
        elif wrapper_type in AMP_VARIANT:
            wrapper.type = AMP_VARIANT[wrapper_type]
            wrapper.setdefault('loss_scale', 'dynamic')
        else:
            raise ValueError(f'--amp: no AMP variant known for optim_wrapper type {wrapper_type!r}')
    if auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError('--auto-scale-lr needs `auto_scale_lr = dict(enable=..., base_batch_size=...)` '
                               'in the config')
        cfg.auto_scale_lr.enable = True
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume


def prepare_test_cfg(cfg: Config, show: bool = False, wait_time: float = 2, show_dir=None, tta: bool = False) -> None:
    """Apply tools/test.py's switches to ``cfg`` in place (mmdet 3.x semantics, except that --tta without a
    ``tta_model`` and ``tta_pipeline`` in the config is an error rather than a silently assumed flip TTA)."""
    if show or show_dir:
        from types import SimpleNamespace

        from mmdet.engine.hooks.utils import trigger_visualization_hook
        trigger_visualization_hook(cfg, SimpleNamespace(show=show, wait_time=wait_time, show_dir=show_dir))
    if tta:
        missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
        if missing:
            raise ValueError(
                f'--tta: the config defines no {" and no ".join(missing)}; add both (mmdet\'s '
                f'configs/retinanet/retinanet_tta.py shows the form: a tta_model wrapping the detector and a '
                f'tta_pipeline ending in TestTimeAug). mmdet 3.3\'s DetTTAModel merges boxes only and refuses '
                f'mask predictions, so a Mask R-CNN (every config here) needs a TTA model that also merges masks')
        # what mmdet's tools/test.py does: the TTA model wraps the detector and the test data goes through the
        # TTA pipeline
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def _datasets(dataset_cfg) -> Iterable[dict]:
    """Yield the leaf dataset configs under dataset wrappers (Repeat/Concat/ClassBalanced...)."""
    if dataset_cfg is None:
        return
    if 'datasets' in dataset_cfg:
        for d in dataset_cfg['datasets']:
            yield from _datasets(d)
    elif 'dataset' in dataset_cfg:
        yield from _datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def _metrics(evaluator_cfg) -> Iterable[dict]:
    """Yield the metric configs of an evaluator config: a dict, a list of dicts, or dict(metrics=...)."""
    if not evaluator_cfg:
        return
    if isinstance(evaluator_cfg, (list, tuple)):
        for m in evaluator_cfg:
            yield from _metrics(m)
    elif 'metrics' in evaluator_cfg:
        yield from _metrics(evaluator_cfg['metrics'])
    else:
        yield evaluator_cfg


def check_data_exists(cfg: Config, splits=('train_dataloader', 'val_dataloader')) -> None:
    """Fail early, before anything is built or written, when a dataset's or an evaluator's files are not where the
    config says. Each dataloader split is checked with its evaluator (``val_dataloader`` with ``val_evaluator``);
    the default splits are what training reads, tools/test.py passes ``('test_dataloader', )``."""
    for split in splits:
        loader = cfg.get(split)
        if not loader:
            continue
        paths = []  # (where, what, path, data_root or None)
        generates = False
        for ds in _datasets(loader.get('dataset')):
            if ds.get('type') in SELF_GENERATING_DATASETS:
                generates = True
                continue
            root = ds.get('data_root', '') or ''
            ann = ds.get('ann_file', '') or ''
            if ann:
                paths.append((split, 'annotation file', ann if osp.isabs(ann) else osp.join(root, ann), root))
            img_dir = (ds.get('data_prefix') or {}).get('img', '')
            if img_dir:
                paths.append((split, 'image directory', img_dir if osp.isabs(img_dir) else osp.join(root, img_dir),
                              root))
            if not ann and not img_dir and root:
                paths.append((split, 'data root', root, root))
        # a self-generating dataset also writes the annotations its evaluator reads, but only once it is built
        evaluator = split.replace('_dataloader', '_evaluator')
        for metric in () if generates else _metrics(cfg.get(evaluator)):
            if metric.get('ann_file'):  # read as given: absolute or relative to the working directory
                paths.append((evaluator, 'annotation file', metric['ann_file'], None))
        for where, what, path, root in paths:
            if '://' in path or osp.exists(path):  # remote storage (backend_args) cannot be checked from here
                continue
            given = '' if root is None else f' (data_root={root!r})'
            raise FileNotFoundError(
                f'{where}: {what} not found: expected {osp.abspath(path)!r}{given}. Put COCO 2017 there '
                f'(annotations/instances_{{train,val}}2017.json, train2017/, val2017/) or point the config at it, '
                f'datasets and evaluators alike: --cfg-options {COCO_OVERRIDES}. To try the project without COCO, '
                f'run the embedded demo: python tools/train.py {DEMO_CONFIG}')


def slurm_dist_env(environ, port=None) -> dict:
    """The variables torchrun would have set, from SLURM's, as mmengine's slurm launcher sets them: the rank, world
    size and local rank always from SLURM (sbatch exports the submitting shell's environment, so a RANK left there
    must not win); MASTER_PORT from ``port`` (the config's dist_cfg), else the environment, else 29500;
    MASTER_ADDR from the environment, else the job's first node."""
    env = dict(RANK=environ['SLURM_PROCID'], WORLD_SIZE=environ['SLURM_NTASKS'],
               LOCAL_RANK=environ.get('SLURM_LOCALID', '0'),
               MASTER_PORT=str(port) if port is not None else environ.get('MASTER_PORT', '29500'))
    if 'MASTER_ADDR' in environ:
        env['MASTER_ADDR'] = environ['MASTER_ADDR']
    else:
        nodes = subprocess.check_output(['scontrol', 'show', 'hostnames', environ['SLURM_NODELIST']], text=True)
        env['MASTER_ADDR'] = nodes.split()[0]
    return env


def init_cpu_process_group(launcher: str, cfg: Config) -> None:
    """Start a gloo process group for multi-process runs on machines without CUDA.

    mmengine 0.10.7's pytorch and slurm launchers call ``torch.cuda.set_device`` and fail on CPU-only torch; once a
    process group exists the Runner uses it as it is. On GPU machines this does nothing: mmengine's launchers run.
    """
    if launcher == 'none' or torch.cuda.is_available() or torch.distributed.is_initialized():
        return
    if launcher == 'slurm':
        os.environ.update(slurm_dist_env(os.environ, cfg.get('env_cfg', {}).get('dist_cfg', {}).get('port')))
    elif launcher != 'pytorch':
        raise RuntimeError(f'launcher {launcher!r} is not supported without CUDA; use pytorch or slurm')
    torch.distributed.init_process_group(backend='gloo')
    # mmengine's default DDP wrapper passes device_ids=[LOCAL_RANK], which DDP refuses for CPU modules
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                                     find_unused_parameters=cfg.get('find_unused_parameters', False))


def build_runner(cfg: Config):
    """mmengine's Runner, or the config's ``runner_type`` (the COCO recipe uses ``ResumableRunner``)."""
    if 'runner_type' in cfg:
        from mmdet.registry import RUNNERS
        return RUNNERS.build(cfg)
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg)

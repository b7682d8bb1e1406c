"""Train a detector: ``python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] ...``.

mmdet 3.x's arguments; everything else is the config's. Thin on purpose: checks live in projects/vim_disc.
"""
import argparse
import os
import os.path as osp

from _bootstrap import setup_repo_path

setup_repo_path()

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from projects.vim_disc.engine import (install_preemption_signal_handlers,  # noqa: E402
                                      install_safe_checkpoint_loading, resolve_resume_checkpoint)
from projects.vim_disc.utils import check_data_exists, init_cpu_process_group, prepare_train_cfg  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description='Train a vim-disc detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False, help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true', help='enable automatically scaling LR')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint; without a path, from the latest checkpoint in the work dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main():
    # a SLURM signal that arrives while the model is still being built must be recorded, not fatal
    install_preemption_signal_handlers()
    args = parse_args()
    install_safe_checkpoint_loading()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    prepare_train_cfg(cfg, amp=args.amp, auto_scale_lr=args.auto_scale_lr, resume=args.resume)
    check_data_exists(cfg)
    # refuse a bad checkpoint before the runner creates anything in the work dir
    resolve_resume_checkpoint(cfg)
    init_cpu_process_group(args.launcher, cfg)
    if 'runner_type' in cfg:
        from mmdet.registry import RUNNERS
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    runner.train()


if __name__ == '__main__':
    main()

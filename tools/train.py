"""Train a detector: ``python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] ...``.

mmdet 3.x's arguments; everything else is the config's. Thin on purpose: checks live in projects/vim_disc.
"""
import argparse

from _bootstrap import setup_repo_path

setup_repo_path()

from projects.vim_disc.engine import (install_preemption_signal_handlers,  # noqa: E402
                                      install_safe_checkpoint_loading, resolve_resume_checkpoint)
from projects.vim_disc.utils import (add_common_args, build_runner, check_data_exists,  # noqa: E402
                                     init_cpu_process_group, load_tool_config, prepare_train_cfg)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a vim-disc detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', default=False, help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true', help='enable automatically scaling LR')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint; without a path, from the latest checkpoint in the work dir')
    add_common_args(parser)
    return parser.parse_args()


def main():
    # a SLURM signal that arrives while the model is still being built must be recorded, not fatal
    install_preemption_signal_handlers()
    args = parse_args()
    install_safe_checkpoint_loading()
    cfg = load_tool_config(args)
    prepare_train_cfg(cfg, amp=args.amp, auto_scale_lr=args.auto_scale_lr, resume=args.resume)
    check_data_exists(cfg)
    # refuse a bad checkpoint before the runner creates anything in the work dir
    resolve_resume_checkpoint(cfg)
    init_cpu_process_group(args.launcher, cfg)
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()

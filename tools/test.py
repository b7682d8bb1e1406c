"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show]
[--show-dir DIR] [--wait-time S] [--tta] ...`` (mmdet 3.x's arguments)."""
import argparse

from _bootstrap import setup_repo_path

setup_repo_path()

from projects.vim_disc.engine import install_safe_checkpoint_loading  # noqa: E402
from projects.vim_disc.utils import (add_common_args, build_runner, check_data_exists,  # noqa: E402
                                     init_cpu_process_group, load_tool_config, prepare_test_cfg)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) a vim-disc detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', type=str, help='dump predictions to a pickle file for offline evaluation')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='directory where painted images will be saved (under work_dir/timestamp)')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation with the config's tta_model and tta_pipeline")
    add_common_args(parser)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    install_safe_checkpoint_loading()
    cfg = load_tool_config(args)
    cfg.load_from = args.checkpoint
    check_data_exists(cfg, splits=('test_dataloader', ))
    prepare_test_cfg(cfg, show=args.show, wait_time=args.wait_time, show_dir=args.show_dir, tta=args.tta)
    init_cpu_process_group(args.launcher, cfg)
    runner = build_runner(cfg)
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must name a .pkl file, got {args.out!r}')
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()

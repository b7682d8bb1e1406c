"""Train the demo once per discretization rule, with the COCO recipe's per-rule settings, then compare the runs.

    python tools/analysis/demo_rules.py [--rules zoh foh ...] [--work-root work_dirs/demo_rules] \
        [--out docs/images/demo_rules.png] [--cfg-options key=value ...]

Each run is ``tools/train.py configs/demo/vim_demo.py`` with ``model.backbone.discretization``,
``model.backbone.ssm_cfg`` and ``optim_wrapper.clip_grad`` taken from ``configs/vim_<rule>.py``: the demo then
compares exactly what the COCO configs compare, at a size that trains on a CPU. A rule whose work dir already
holds the final checkpoint is not trained again (delete the folder to redo it). Finally
``compare_runs.py`` draws every run on shared axes and writes the markdown table of final metrics.
``--cfg-options`` go to every run (after the rule's own settings).
"""
import argparse
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmengine.config import Config  # noqa: E402

DEMO = 'configs/demo/vim_demo.py'
RULES = ('zoh', 'foh', 'bilinear', 'poly', 'highorder', 'rk4')


def rule_options(rule: str) -> list:
    """``--cfg-options`` that give the demo the settings ``configs/vim_<rule>.py`` gives the COCO recipe."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', f'vim_{rule}.py'))
    backbone = cfg.model.backbone
    options = [f'model.backbone.discretization={backbone.discretization}']
    options += [f'model.backbone.ssm_cfg.{k}={v}' for k, v in sorted(backbone.ssm_cfg.items())]
    options += [f'optim_wrapper.clip_grad.{k}={v}' for k, v in sorted(cfg.optim_wrapper.clip_grad.items())]
    return options


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rules', nargs='+', default=list(RULES), choices=RULES)
    parser.add_argument('--work-root', default='work_dirs/demo_rules')
    parser.add_argument('--out', default=None, help='PNG (default: WORK_ROOT/demo_rules.png); the table is .md beside')
    parser.add_argument('--cfg-options', nargs='+', default=[], help='key=value pairs for every run')
    args = parser.parse_args()
    demo = Config.fromfile(osp.join(ROOT, DEMO))
    demo.merge_from_dict(dict(o.split('=', 1) for o in args.cfg_options))
    max_iters = int(demo.train_cfg.max_iters)

    work_dirs = []
    for rule in args.rules:
        work_dir = osp.join(args.work_root, rule)
        work_dirs.append(work_dir)
        if osp.exists(osp.join(work_dir, f'iter_{max_iters}.pth')):
            print(f'[demo_rules] {rule}: done already ({work_dir})', flush=True)
            continue
        cmd = [sys.executable, 'tools/train.py', DEMO, '--work-dir', work_dir, '--resume',
               '--cfg-options', *rule_options(rule), *args.cfg_options]
        print('[demo_rules]', ' '.join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)

    out = args.out or osp.join(args.work_root, 'demo_rules.png')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    subprocess.run([sys.executable, 'tools/analysis/compare_runs.py', *work_dirs, '--labels', *args.rules,
                    '--out', out, '--table', osp.splitext(out)[0] + '.md'], cwd=ROOT, check=True)


if __name__ == '__main__':
    main()

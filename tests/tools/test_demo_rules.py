"""tools/analysis/demo_rules.py: the demo per rule, with exactly the COCO configs' per-rule settings."""
import argparse
import os.path as osp
import sys

import pytest
from mmengine.config import Config, DictAction

from tests.tools.test_train import ROOT, SMALL, run_tool

sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
import demo_rules  # noqa: E402


def _with_options(cfg, options):
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)  # as tools/train.py does
    return cfg


@pytest.mark.parametrize('rule', demo_rules.RULES)
def test_options_give_the_demo_the_rule_configs_settings(rule):
    coco = Config.fromfile(osp.join(ROOT, 'configs', f'vim_{rule}.py'))
    demo = _with_options(Config.fromfile(osp.join(ROOT, demo_rules.DEMO)), demo_rules.rule_options(rule))
    assert demo.model.backbone.discretization == rule == coco.model.backbone.discretization
    for key, value in coco.model.backbone.ssm_cfg.items():
        assert demo.model.backbone.ssm_cfg[key] == value, key
    assert demo.optim_wrapper.clip_grad == coco.optim_wrapper.clip_grad
    assert demo.model.backbone.arch == Config.fromfile(osp.join(ROOT, demo_rules.DEMO)).model.backbone.arch


@pytest.mark.slow
def test_trains_each_rule_and_draws_the_comparison(tmp_path):
    root, out = tmp_path / 'rules', tmp_path / 'rules.png'
    cmd = [sys.executable, 'tools/analysis/demo_rules.py', '--rules', 'zoh', 'rk4', '--work-root', str(root),
           '--out', str(out), '--cfg-options', *SMALL, 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
           'default_hooks.checkpoint.interval=2']
    first = run_tool(cmd)
    for rule in ('zoh', 'rk4'):
        assert (root / rule / 'iter_2.pth').exists()
        assert f'discretization={rule}' in first.stdout
    table = (tmp_path / 'rules.md').read_text()
    assert '| zoh |' in table and '| rk4 |' in table
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    again = run_tool(cmd)  # finished rules are not trained again
    assert again.stdout.count('done already') == 2

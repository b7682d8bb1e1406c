"""tools/test.py's mmdet 3.x switches: --show, --show-dir, --wait-time, --tta."""
import importlib.util
import os
import os.path as osp
import sys

import pytest
import torch
from mmengine.config import Config

from projects.vim_disc.utils import prepare_test_cfg
from tests.tools.test_train import DEMO, ROOT, run_tool

# tools/test.py on 4 demo images with a 2-layer Vim
SMALL_TEST = ['model.backbone.arch.depth=2', 'test_dataloader.num_workers=0',
              'test_dataloader.persistent_workers=False', 'test_dataloader.dataset.indices=4',
              'test_dataloader.batch_size=2']


@pytest.fixture
def test_tool(monkeypatch):
    """tools/test.py as a module (its parse_args), imported the way `python tools/test.py` runs it."""
    monkeypatch.syspath_prepend(osp.join(ROOT, 'tools'))
    monkeypatch.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))  # the tool extends it: restore afterwards
    spec = importlib.util.spec_from_file_location('vim_disc_tools_test', osp.join(ROOT, 'tools', 'test.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_cfg():
    return Config.fromfile(osp.join(ROOT, DEMO))


def test_arguments_default_to_mmdet_values(test_tool):
    args = test_tool.parse_args(['CFG', 'CKPT'])
    assert (args.show, args.show_dir, args.wait_time, args.tta) == (False, None, 2, False)
    args = test_tool.parse_args(['CFG', 'CKPT', '--show', '--wait-time', '0.5', '--show-dir', 'painted', '--tta'])
    assert (args.show, args.show_dir, args.wait_time, args.tta) == (True, 'painted', 0.5, True)


def test_show_switches_the_visualization_hook_on():
    cfg = demo_cfg()
    assert not cfg.default_hooks.visualization.get('draw', False)
    prepare_test_cfg(cfg, show=True, wait_time=0.5)
    hook = cfg.default_hooks.visualization
    assert (hook.draw, hook.show, hook.wait_time) == (True, True, 0.5) and 'test_out_dir' not in hook

    cfg = demo_cfg()
    prepare_test_cfg(cfg, show_dir='painted', wait_time=0.5)
    hook = cfg.default_hooks.visualization
    assert (hook.draw, hook.test_out_dir) == (True, 'painted') and 'show' not in hook and 'wait_time' not in hook

    cfg = demo_cfg()
    prepare_test_cfg(cfg)
    assert 'draw' not in cfg.default_hooks.visualization

    cfg = demo_cfg()
    del cfg.default_hooks['visualization']
    with pytest.raises(RuntimeError, match='VisualizationHook'):
        prepare_test_cfg(cfg, show_dir='painted')


@pytest.mark.parametrize('defined', [(), ('tta_model', ), ('tta_pipeline', )])
def test_tta_without_its_config_is_refused(defined):
    cfg = demo_cfg()
    cfg.merge_from_dict({key: dict(type='DetTTAModel') if key == 'tta_model' else [] for key in defined})
    model = cfg.model.to_dict()
    with pytest.raises(ValueError) as err:
        prepare_test_cfg(cfg, tta=True)
    for key in ('tta_model', 'tta_pipeline'):
        assert (f'no {key}' in str(err.value)) == (key not in defined)
    assert cfg.model.to_dict() == model  # nothing half-applied


def test_tta_wraps_the_model_and_replaces_the_test_pipeline():
    cfg = demo_cfg()
    model, val_pipeline = cfg.model.to_dict(), cfg.val_dataloader.dataset.pipeline
    tta_pipeline = [dict(type='LoadImageFromFile'),
                    dict(type='TestTimeAug', transforms=[[dict(type='RandomFlip', prob=1.),
                                                          dict(type='RandomFlip', prob=0.)],
                                                         [dict(type='PackDetInputs')]])]
    cfg.tta_model = dict(type='DetTTAModel', tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    cfg.tta_pipeline = tta_pipeline
    prepare_test_cfg(cfg, tta=True)
    assert cfg.model.type == 'DetTTAModel' and cfg.model.tta_cfg.max_per_img == 100
    assert cfg.model.module.to_dict() == model
    assert cfg.test_dataloader.dataset.pipeline == tta_pipeline
    assert cfg.val_dataloader.dataset.pipeline == val_pipeline


def test_tta_error_from_the_command_line(tmp_path):
    work = tmp_path / 'never'
    proc = run_tool([sys.executable, 'tools/test.py', DEMO, str(tmp_path / 'unused.pth'), '--tta', '--work-dir',
                     str(work)], check=False, timeout=300)
    assert proc.returncode != 0
    assert 'ValueError: --tta: the config defines no tta_model and no tta_pipeline' in proc.stderr
    assert not work.exists()


@pytest.mark.slow
def test_show_dir_paints_every_test_image(tmp_path):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    import projects.vim_disc  # noqa: F401
    cfg = demo_cfg()
    cfg.merge_from_dict({'model.backbone.arch.depth': 2})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, tmp_path / 'random.pth')

    work = tmp_path / 'test'
    run_tool([sys.executable, 'tools/test.py', DEMO, str(tmp_path / 'random.pth'), '--work-dir', str(work),
              '--show-dir', 'painted', '--cfg-options'] + SMALL_TEST)
    (run, ) = [d for d in os.listdir(work) if osp.isdir(work / d)]  # mmdet: work_dir/<timestamp>/<show_dir>
    assert sorted(os.listdir(work / run / 'painted')) == [f'{i:06d}.png' for i in range(4)]

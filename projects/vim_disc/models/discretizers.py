"""The discretization-rule registry: how configs name a rule.

The math of each rule lives once, in ``kernels/discretization.py`` (pure torch + triton). This module only makes
those classes buildable from configs: ``discretization='bilinear'`` or ``discretization=dict(type='MyRule', ...)``.
A user registers a new rule from their own module with ``@DISCRETIZERS.register_module()`` on a
``kernels.Discretizer`` subclass; nothing else changes.
"""
from mmengine.registry import Registry

from kernels.discretization import RULES, Discretizer

DISCRETIZERS = Registry('discretizer', scope='mmdet', locations=['projects.vim_disc.models'])

for _name, _cls in RULES.items():
    DISCRETIZERS.register_module(name=_name, module=_cls)


def build_discretizer(cfg) -> Discretizer:
    """Resolve a rule name, a ``dict(type=...)`` config or an instance into a Discretizer.

    Unknown names raise ``ValueError`` listing every registered rule: a typo must never fall back to zoh.
    """
    if isinstance(cfg, Discretizer):
        return cfg
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'discretization must be a rule name, a dict(type=...) or a Discretizer, got {cfg!r}')
    rule_type = cfg['type']
    if isinstance(rule_type, str) and DISCRETIZERS.get(rule_type) is None:
        valid = ', '.join(sorted(DISCRETIZERS.module_dict))
        raise ValueError(f'unknown discretization rule {rule_type!r}; valid rules: {valid}')
    rule = DISCRETIZERS.build(cfg)
    if not isinstance(rule, Discretizer):
        raise TypeError(f'{rule_type!r} built a {type(rule).__name__}, not a kernels.Discretizer')
    return rule

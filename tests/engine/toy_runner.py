"""A real mmengine Runner around a two-parameter-tensor regression model: fast enough for unit tests.

Every piece is deterministic on CPU (fixed data per index, seeded sampler, seeded init), so two runs of the
same length end with identical weights, which is what the resume tests compare.
"""
import itertools

import torch
import torch.nn as nn
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from projects.vim_disc.engine.checkpoint import install_safe_checkpoint_loading


class ToyRegressor(BaseModel):
    """y = w x + b with an MSE loss split into two named terms (so log_vars has several loss keys)."""

    def __init__(self, dropout: float = 0.25):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.dropout = nn.Dropout(p=dropout)  # consumes the torch RNG each step: resume must restore it

    def forward(self, x, y, mode='loss'):
        x = torch.stack(x) if isinstance(x, (list, tuple)) else x
        y = torch.stack(y) if isinstance(y, (list, tuple)) else y
        err = self.lin(self.dropout(x)) - y
        if mode != 'loss':
            return err
        return dict(loss_pos=err.clamp(min=0).pow(2).mean(), loss_neg=err.clamp(max=0).pow(2).mean())


class ToyDataset(Dataset):
    """Sample i is fixed by i alone, so data never depends on the order of reads."""

    def __init__(self, size: int = 13):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(3, generator=g)
        return dict(x=x, y=x.sum(0, keepdim=True) * 0.5 + 0.1 * torch.randn(1, generator=g))


_runs = itertools.count()


def toy_runner(work_dir, max_iters=6, ckpt_interval=3, resume=False, load_from=None, batch_size=2,
               optim_wrapper=None, custom_hooks=None, sampler=None, train_cfg=None, param_scheduler='default',
               dataset_size=13, log_interval=1, dropout=0.25, dataset=None, model=None, runner_cls=Runner,
               **kwargs) -> Runner:
    if optim_wrapper is None:
        optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9))
    if param_scheduler == 'default':
        param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3),
                           dict(type='MultiStepLR', by_epoch=False, milestones=[5], gamma=0.5)]
    torch.manual_seed(0)  # same initial weights in every run (for a model built here)
    install_safe_checkpoint_loading()  # what tools/train.py does first: resume loads with weights_only=True
    return runner_cls(
        model=model if model is not None else ToyRegressor(dropout),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=dataset if dataset is not None else ToyDataset(dataset_size),
            sampler=sampler or dict(type='InfiniteSampler', shuffle=True),
            batch_size=batch_size, num_workers=0, collate_fn=dict(type='default_collate')),
        train_cfg=train_cfg or dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=optim_wrapper,
        param_scheduler=param_scheduler,
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=log_interval),
            checkpoint=dict(type='CheckpointHook', interval=ckpt_interval, by_epoch=False)),
        custom_hooks=custom_hooks,
        resume=resume, load_from=load_from,
        randomness=dict(seed=0),
        # mmengine shares one MessageHub per experiment name (a timestamp): keep runs of one test apart
        experiment_name=f'toy_{next(_runs)}',
        **kwargs)


def weights(runner: Runner) -> dict:
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FakeMixer(nn.Module):
    """The statistics contract of Vim's BiMambaMixer on a toy computation.

    Same parameter names per direction (A_log / A_b_log, D / D_b, dt_proj(_b), x_proj(_b)), a
    ``discretizer``, ``record_stats`` and ``ssm_stats = {'fwd'|'bwd': dict(delta=(B, D, L), A=(D, N))}``.
    ``delta_scale`` multiplies delta (to push z past a rule's stability bound).
    """

    def __init__(self, discretizer, d_inner=5, d_state=3, dt_rank=2, delta_scale=1.0):
        super().__init__()
        self.discretizer = discretizer
        self.record_stats = False
        self.ssm_stats = None
        self.dt_rank = dt_rank
        self.delta_scale = delta_scale
        for suffix in ('', '_b'):
            setattr(self, 'x_proj' + suffix, nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False))
            setattr(self, 'dt_proj' + suffix, nn.Linear(dt_rank, d_inner))
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
            setattr(self, 'A_log' if suffix == '' else 'A_b_log', nn.Parameter(torch.log(A)))
            setattr(self, 'D' + suffix, nn.Parameter(torch.ones(d_inner)))

    def forward(self, x):  # (B, L, d_inner)
        out = 0
        for direction, suffix, A_log in (('fwd', '', self.A_log), ('bwd', '_b', self.A_b_log)):
            xs = x if direction == 'fwd' else x.flip(1)
            dt = getattr(self, 'x_proj' + suffix)(xs)[..., :self.dt_rank]
            delta = torch.nn.functional.softplus(getattr(self, 'dt_proj' + suffix)(dt)).transpose(1, 2)
            delta = delta * self.delta_scale
            A = -torch.exp(A_log)
            if self.record_stats:
                stats = self.ssm_stats if self.ssm_stats is not None else {}
                stats[direction] = dict(delta=delta.detach().float(), A=A.detach())
                self.ssm_stats = stats
            decay = torch.exp(delta[..., None] * A[None, :, None, :]).mean(-1)  # (B, D, L)
            out = out + (decay * xs.transpose(1, 2)).mean() + getattr(self, 'D' + suffix).mean() * xs.mean()
        return out


class ToySSMModel(BaseModel):
    """backbone.layers.{i}.mixer = FakeMixer, fed by a linear embedding of the toy inputs."""

    def __init__(self, discretizer, depth=2, d_inner=5, delta_scale=1.0, nan_iters=()):
        super().__init__()
        self.nan_iters = set(nan_iters)  # runner iterations whose loss is NaN, from the model itself
        self.embed = nn.Linear(3, 4 * d_inner)
        self.d_inner = d_inner
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.mixer = FakeMixer(discretizer, d_inner=d_inner, delta_scale=delta_scale)
            self.backbone.layers.append(block)

    def forward(self, x, y, mode='loss'):
        x = torch.stack(x) if isinstance(x, (list, tuple)) else x
        y = torch.stack(y) if isinstance(y, (list, tuple)) else y
        h = self.embed(x).view(x.shape[0], 4, self.d_inner)  # (B, L=4, d_inner)
        pred = sum(layer.mixer(h) for layer in self.backbone.layers)
        loss = (pred - y.mean()).pow(2)
        if MessageHub.get_current_instance().get_info('iter') in self.nan_iters:
            loss = loss * float('nan')
        return dict(loss_fit=loss)

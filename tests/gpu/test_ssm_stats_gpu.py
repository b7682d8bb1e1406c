"""SSMStatsHook's summaries on CUDA equal the CPU ones (the CUDA path takes p99 from a sort, not kthvalue)."""
import pytest
import torch

from kernels.discretization import get_discretizer
from projects.vim_disc.engine.hooks import summarize_direction

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize('rule', ['zoh', 'rk4'])
def test_cuda_summary_equals_cpu(rule):
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(2, 384, 4096, generator=g) * 3
    A = -(torch.rand(384, 16, generator=g) * 16 + 0.5)
    rule = get_discretizer(rule)
    cpu = summarize_direction(delta, A, rule)
    cuda = summarize_direction(delta.cuda(), A.cuda(), rule)
    assert cpu.keys() == cuda.keys()
    assert torch.equal(cuda['delta_p99'].cpu(), cpu['delta_p99'])  # an element of delta, the same one
    for key in cpu:
        torch.testing.assert_close(cuda[key].cpu().float(), cpu[key].float(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=key: f'{k}: {m}')

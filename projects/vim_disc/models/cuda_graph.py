"""CUDA graphs of the Vim backbone's forward AND backward, inside an ordinary eager training step.

The backbone is launch-bound (hundreds of small kernels per layer, 24 layers): replaying its forward and
backward as two CUDA graphs removes the Python and launch overhead while the rest of the detector, the loss,
DDP's all-reduce, the optimizer and every hook stay eager. ``VimBackbone.forward`` calls
:func:`graphed_forward` when its ``cuda_graph`` switch is on; that decides, per call:

* eager (silently) in eval mode, without grad, and on SSM-statistics iterations (a mixer with
  ``record_stats`` on stores tensors in Python during forward, which a replay would not do);
* eager with one logged note when the input is not on CUDA or ``with_cp`` is on;
* otherwise by input *signature* (shape, dtype, device, requires_grad, autocast dtype): the first
  ``cuda_graph_warmup`` calls of a new signature run eagerly (Triton compiles its kernels, cuBLAS picks its
  algorithms), the next one captures (:func:`capture_fwd_bwd`) and replays; at most ``cuda_graph_max``
  signatures are captured, any other runs eagerly with one warning per signature;
* a failed capture, or parameters whose storage moved after a capture (``.to()``, ``.data = ...``), log
  the reason and leave the backbone eager for good: the optimisation never stops a training run.

Semantics of a replay, as exact as eager:
* inputs are copied into the graph's own static buffers; parameters are read in place (the optimizer's
  in-place updates and ``load_state_dict`` are seen; replaced storages are detected, see above);
* no random numbers are drawn inside a graph: DropPath's per-sample masks of a step are drawn by the backbone
  in one call outside it (``VimBackbone.drop_path_scales``) and copied in like the images, so each replay
  uses fresh masks and capture-on and capture-off runs draw the same random stream. (Drawing them inside
  the capture failed on the H200, torch 2.11: the capture was invalidated and the CUDA generator left in
  capture mode, "Offset increment outside graph capture encountered unexpectedly".)
* parameter gradients leave the backward graph as FRESH tensors into the usual ``AccumulateGrad``:
  accumulation across micro-batches, ``zero_grad(set_to_none=False)``, post-accumulate-grad hooks (the SSM
  statistics hook's, DDP's) behave as in eager. ``torch.cuda.make_graphed_callables`` is not used because it
  hands the graph's static gradient buffers to ``AccumulateGrad``, which adopts them as ``param.grad`` (the
  next replay then overwrites that grad, and accumulation doubles the new gradient: pytorch issue #181723);
* the OUTPUT of a replay is a static buffer that the next replay overwrites: use it (and run its backward)
  within the step, as a detector does. A backward run after a newer replay raises instead of returning
  wrong gradients.

DDP: only the backbone is captured; collectives stay in DDP's eager hooks, issued in bucket order whatever
order the gradients arrive in, so a rank that falls back to eager cannot deadlock the others. Captures use
``capture_error_mode='thread_local'`` so that other threads (NCCL's watchdog, the pin-memory thread) may
keep calling the CUDA runtime during a capture.
"""
import logging
import time
import weakref
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from mmengine.logging import print_log
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten


class Signature(NamedTuple):
    """What a captured graph is specialised to: a call with another signature cannot replay it."""
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    autocast: Optional[torch.dtype]  # the autocast dtype for the input's device type, None when off

    def __str__(self):
        amp = f', autocast {self.autocast}' if self.autocast is not None else ''
        grad = ', requires grad' if self.requires_grad else ''
        return f'{tuple(self.shape)} {self.dtype} on {self.device}{amp}{grad}'


def input_signature(x: torch.Tensor) -> Signature:
    kind = x.device.type
    amp = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return Signature(tuple(x.shape), x.dtype, x.device, x.requires_grad, amp)


def _capturable(x: torch.Tensor) -> bool:
    """Whether ``x`` lives where CUDA graphs exist (the seam the CPU tests patch)."""
    return x.is_cuda


# ---------------------------------------------------------------------------------------------------
# One captured forward + backward
# ---------------------------------------------------------------------------------------------------
class CapturedGraphs:
    """A forward graph and a backward graph of one function at one signature, with their static tensors.

    Calling it replays the forward and returns the (static) outputs, with an autograd node whose backward
    replays the backward graph. ``fwd`` / ``bwd`` need only a ``replay()`` method.

    Args:
        fwd, bwd: the two graphs.
        static_args: the captured function's input buffers (new inputs are copied into them).
        params: parameters the function reads; gradients are returned for those in ``static_grads``.
        static_outputs: flat outputs written by ``fwd``; ``spec`` rebuilds the function's output structure.
        static_grad_outputs: per output, the buffer ``bwd`` reads the incoming gradient from (None: no grad).
        static_grads: per entry of ``static_args + params``, the gradient ``bwd`` writes (None: no grad).

    Parameters without a gradient stay out of the autograd graph, as in eager: DDP with
    ``find_unused_parameters`` must not wait for them.
    """

    def __init__(self, fwd, bwd, static_args: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                 static_outputs: Sequence[torch.Tensor], spec, static_grad_outputs: Sequence[Optional[torch.Tensor]],
                 static_grads: Sequence[Optional[torch.Tensor]]):
        assert len(static_grads) == len(static_args) + len(params)
        self.fwd, self.bwd = fwd, bwd
        n = len(static_args)
        arg_grads, param_grads = list(static_grads[:n]), [g for g in static_grads[n:] if g is not None]
        self.static_args = tuple(static_args)
        self.params = tuple(p for p, g in zip(params, static_grads[n:]) if g is not None)
        self.static_outputs, self.spec = tuple(static_outputs), spec
        self.static_grad_outputs = tuple(static_grad_outputs)
        self.grad_mask = tuple(g is not None for g in arg_grads) + (True, ) * len(self.params)
        self.computed_grads = [g for g in arg_grads if g is not None] + param_grads
        self.generation = 0  # forward replays so far: a backward must belong to the latest one

    def __call__(self, *args: torch.Tensor):
        if len(args) != len(self.static_args):
            raise TypeError(f'captured with {len(self.static_args)} tensor arguments, called with {len(args)}')
        outputs = _Replay.apply(self, *args, *self.params)
        return tree_unflatten(list(outputs), self.spec)


class _Replay(torch.autograd.Function):
    """Forward: copy the inputs in, replay ``fwd``. Backward: copy the output gradients in, replay ``bwd``."""

    @staticmethod
    def forward(ctx, graphs: CapturedGraphs, *inputs: torch.Tensor):
        for static, new in zip(graphs.static_args, inputs):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new)
        graphs.fwd.replay()
        graphs.generation += 1
        ctx.graphs, ctx.generation = graphs, graphs.generation
        return tuple(o.detach() for o in graphs.static_outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        graphs = ctx.graphs
        if ctx.generation != graphs.generation:
            raise RuntimeError(
                'the CUDA graph of this forward was replayed again before its backward ran: the activations it '
                'saved are overwritten. Run each forward\'s backward before the next training forward, or set '
                'the backbone\'s cuda_graph=False')
        for static, grad in zip(graphs.static_grad_outputs, grad_outputs):
            if static is not None and static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        graphs.bwd.replay()
        # fresh tensors, never the graph's buffers: AccumulateGrad may adopt what it receives as param.grad, and
        # the next replay would overwrite it (x * 1 is exact; a few multi-tensor launches instead of one per tensor)
        fresh = iter(torch._foreach_mul(graphs.computed_grads, 1.0) if graphs.computed_grads else ())
        return (None, ) + tuple(next(fresh) if has_grad else None for has_grad in graphs.grad_mask)


def capture_fwd_bwd(fn: Callable, sample_args: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                    warmup_iters: int = 1) -> CapturedGraphs:
    """Capture ``fn(*sample_args)`` and its backward (w.r.t. the args and ``params`` that require grad).

    Runs under the caller's autocast dtype with the autocast weight cache off (a cached cast made during
    capture would be freed or reused behind the graph's back); nested inside an outer autocast with the cache
    on, that is sound: the inner context neither reads nor fills the cache and hands it back untouched.
    ``warmup_iters`` eager fwd+bwd passes on the capture stream come first (its cuBLAS workspace, lazy
    initialisation). ``fn`` must not draw random numbers: a graph would replay the same draws (or, with the
    generator registered, tie the run's random stream to the capture); the backbone draws DropPath's masks outside
    and passes them in (VimBackbone.drop_path_scales). ``fn``'s outputs: a tensor or a pytree of tensors.
    """
    device = sample_args[0].device
    static_args = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in sample_args)
    params = tuple(params)
    surface = static_args + params
    wrt = [t for t in surface if t.requires_grad]
    amp_enabled = torch.is_autocast_enabled(device.type)
    amp_dtype = torch.get_autocast_dtype(device.type)
    stream = torch.cuda.Stream(device)
    fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()  # one private pool: the backward reads what the forward saved
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_enabled, cache_enabled=False):
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup_iters):
                outs = [o for o in tree_flatten(fn(*static_args))[0] if o.requires_grad]
                if not outs or not wrt:
                    raise ValueError('nothing to differentiate: no output or no input/parameter requires grad')
                torch.autograd.grad(outs, wrt, [torch.zeros_like(o) for o in outs], allow_unused=True)
                del outs
        torch.cuda.current_stream(device).wait_stream(stream)

        with torch.cuda.graph(fwd, pool=pool, stream=stream, capture_error_mode='thread_local'):
            outputs = fn(*static_args)
        static_outputs, spec = tree_flatten(outputs)
        diff = [o for o in static_outputs if o.requires_grad]
        if not diff or not wrt:
            raise ValueError('nothing to differentiate: no output or no input/parameter requires grad')
        static_grad_outputs = [torch.empty_like(o) if o.requires_grad else None for o in static_outputs]
        with torch.cuda.graph(bwd, pool=pool, stream=stream, capture_error_mode='thread_local'):
            grads = torch.autograd.grad(diff, wrt, [g for g in static_grad_outputs if g is not None],
                                        allow_unused=True)
    grads = iter(grads)
    static_grads = [next(grads) if t.requires_grad else None for t in surface]
    # detached aliases keep the buffers and drop the autograd nodes of the capture
    static_outputs = [o.detach() for o in static_outputs]
    return CapturedGraphs(fwd, bwd, static_args, params, static_outputs, spec, static_grad_outputs, static_grads)


# ---------------------------------------------------------------------------------------------------
# Per-backbone decisions
# ---------------------------------------------------------------------------------------------------
class CudaGraphState:
    """What :func:`graphed_forward` keeps per backbone (outside the module: see :func:`cuda_graph_state`)."""

    def __init__(self):
        self.graphs = {}  # Signature -> CapturedGraphs
        self.warmup_calls = {}  # Signature -> eager calls made while warming up
        self.param_key = None  # parameter storages at capture time
        self.disabled: Optional[str] = None  # why capture is off for good
        self.logged = set()  # keys of one-time messages already printed
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0


# Keyed weakly by the backbone and never stored on it: state_dict, deepcopy (EMA), pickling and the module tree
# do not see graphs; the state (which holds no reference to the backbone) goes when the backbone goes.
_STATES: 'weakref.WeakKeyDictionary[torch.nn.Module, CudaGraphState]' = weakref.WeakKeyDictionary()


def cuda_graph_state(backbone: torch.nn.Module) -> CudaGraphState:
    """The backbone's capture state: ``captures``, ``replays``, ``eager_calls``, ``graphs``, ``disabled``."""
    state = _STATES.get(backbone)
    if state is None:
        state = _STATES[backbone] = CudaGraphState()
    return state


def release_cuda_graphs(backbone: torch.nn.Module) -> None:
    """Forget the backbone's graphs (their memory pools are freed); the next training calls warm up again."""
    _STATES.pop(backbone, None)


def _log_once(state: CudaGraphState, key, message: str, level=logging.INFO) -> None:
    if key not in state.logged:
        state.logged.add(key)
        print_log(f'VimBackbone CUDA graph: {message}', logger='current', level=level)


def _param_key(backbone: torch.nn.Module) -> tuple:
    return (tuple((p.data_ptr(), p.requires_grad) for p in backbone.parameters())
            + tuple(b.data_ptr() for b in backbone.buffers()))


def _eager_reason(backbone, x: torch.Tensor, state: CudaGraphState) -> Optional[str]:
    if not backbone.training or not torch.is_grad_enabled():
        return 'eval / no grad'
    if state.disabled is not None:
        return state.disabled
    if not _capturable(x):
        _log_once(state, 'device', f'input on {x.device}: CUDA graphs need CUDA, running eagerly')
        return 'not CUDA'
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return 'inside an outer capture'
    if backbone.with_cp:
        _log_once(state, 'with_cp', 'with_cp=True (activation checkpointing) is not captured: running eagerly')
        return 'with_cp'
    if any(m.record_stats for m in backbone.mixers):
        return 'SSM statistics iteration'
    return None


def graphed_forward(backbone, x: torch.Tensor, *extra: torch.Tensor):
    """``backbone.forward_eager(x, *extra)``, or a replay of its CUDA graphs when that is exact (module docstring).

    ``backbone`` provides ``forward_eager``, ``training``, ``with_cp``, ``mixers`` (with ``record_stats``),
    ``cuda_graph_warmup`` and ``cuda_graph_max``. ``extra``: further tensor inputs whose shape follows from x's
    (the DropPath factors, drawn outside the graph), copied in like x.
    """
    state = cuda_graph_state(backbone)
    if _eager_reason(backbone, x, state) is not None:
        state.eager_calls += 1
        return backbone.forward_eager(x, *extra)
    sig = input_signature(x)
    graphs = state.graphs.get(sig)
    if graphs is None:
        if len(state.graphs) >= backbone.cuda_graph_max:
            captured = ', '.join(map(str, state.graphs)) or 'none'
            _log_once(state, ('signature', sig),
                      f'input {sig} runs eagerly: cuda_graph_max={backbone.cuda_graph_max} signature(s) already '
                      f'captured ({captured}). Pad batches to one size (e.g. BatchFixedSizePad) or raise '
                      'cuda_graph_max (each graph keeps its own activation memory)', logging.WARNING)
            state.eager_calls += 1
            return backbone.forward_eager(x, *extra)
        seen = state.warmup_calls.get(sig, 0)
        if seen < backbone.cuda_graph_warmup:
            state.warmup_calls[sig] = seen + 1
            state.eager_calls += 1
            return backbone.forward_eager(x, *extra)
        graphs = _capture(backbone, (x, *extra), sig, state)
        if graphs is None:
            state.eager_calls += 1
            return backbone.forward_eager(x, *extra)
    elif _param_key(backbone) != state.param_key:
        _disable(backbone, state, 'the backbone\'s parameters were replaced or moved (or requires_grad changed) '
                 'since the capture; the graphs would read stale memory')
        state.eager_calls += 1
        return backbone.forward_eager(x, *extra)
    state.replays += 1
    return graphs(x, *extra)


def _release_generator(device: torch.device) -> None:
    """After a failed capture: a capture that dies inside ``torch.cuda.graph`` never reaches the CUDA generator's
    capture epilogue, so every later random draw raises "Offset increment outside graph capture encountered
    unexpectedly" (seen on the H200, torch 2.11, docs/performance.md) and the eager fallback would crash at the
    next DropPath. One trivial capture runs the prologue/epilogue pair again. Not yet verified on a GPU."""
    if device.type != 'cuda':
        return
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.zeros(1, device=device).add_(1)
        del graph
        torch.rand(1, device=device)  # raises if the generator is still stuck in capture mode
    except Exception as e:  # noqa: BLE001
        print_log(f'VimBackbone CUDA graph: the CUDA generator could not be released after the failed capture '
                  f'({type(e).__name__}: {str(e)[:200]}); random draws on {device} may fail', logger='current',
                  level=logging.ERROR)


def _disable(backbone, state: CudaGraphState, why: str) -> None:
    state.disabled = why
    state.graphs.clear()
    _log_once(state, 'disabled', f'{why}. Running eagerly from now on', logging.WARNING)


def _capture(backbone, args, sig: Signature, state: CudaGraphState) -> Optional[CapturedGraphs]:
    hooked = [n for n, p in backbone.named_parameters() if getattr(p, '_backward_hooks', None)]
    if hooked:  # a tensor hook would run inside the captured backward AND again on the replayed gradient
        _disable(backbone, state, f'parameters with tensor hooks (register_hook) cannot be captured: {hooked[:3]}')
        return None
    ref = weakref.ref(backbone)  # the graphs must not keep the backbone alive (they live in a weak-keyed dict)

    def fn(*inputs):
        return ref().forward_eager(*inputs)

    params = [p for p in backbone.parameters() if p.requires_grad]
    start = time.perf_counter()
    try:
        graphs = capture_fwd_bwd(fn, args, params)
    except Exception as e:  # never stop training for an optimisation
        _disable(backbone, state, f'capture failed for input {sig} ({type(e).__name__}: {str(e)[:500]})')
        _release_generator(args[0].device)
        return None
    state.graphs[sig] = graphs
    state.warmup_calls.pop(sig, None)
    state.param_key = _param_key(backbone)
    state.captures += 1
    _log_once(state, ('captured', sig),
              f'captured forward + backward for input {sig} in {time.perf_counter() - start:.2f} s '
              f'({len(params)} parameter tensors); later training steps of this shape replay it')
    return graphs

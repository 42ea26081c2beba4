"""16-bit copies of a module's ``nn.Linear`` weights, made once per round and put in place of the
fp32 parameters for the round, with their gradients summed into the fp32 ``.grad``.

Why: under autocast every ``linear`` casts its fp32 weight to 16 bits; its backward makes a 16-bit
weight gradient, casts it to a new fp32 tensor and adds that into ``.grad`` — three passes over
memory the size of the weights per micro-batch. On the 200M model with a few dozen rows per
micro-batch that traffic, not arithmetic, is what a backward costs. A round here holds one 16-bit
copy per weight, and its weight gradients reach ``.grad`` in one of two ways:

* **added per micro-batch** (``defer=False``): the copy is a leaf; autograd hands its gradient to a
  hook that adds it into the fp32 ``.grad`` in one pass and drops it. bf16 → fp32 is exact, so
  ``.grad`` holds the same bits as with autocast's own casts.
* **deferred** (``defer=True``, bf16 on the CPU): the Linear's backward computes only the gradient
  of its input and keeps (input, output gradient) rows; the weight gradient of several
  micro-batches is then one matmul over all their rows, added into ``.grad`` once. On the CPU the
  add of a 16-bit gradient into an fp32 one is what costs (it upcasts through a temporary: ~4 ms
  per 4096 x 1024 weight on 2 cores, three times the matmul's 1.2 ms with AMX), so it is paid once
  per flush instead of once per micro-batch. The sum is rounded to bf16 once instead of once per
  micro-batch, so the gradient differs from autocast's in the last bf16 bits (closer to the exact
  one). A weight's rows are flushed when they reach the size of the weight (bounding the extra
  memory by the 16-bit copies' size) and at the end of the round; the flush points depend only on
  that weight's own micro-batch shapes, so the pipeline's stages and the single-process reference
  (which hold different sets of modules) sum the same groups.

Only parameters that no other kind of module shares are swapped: a weight tied to an embedding or
a layer norm must keep its fp32 value there (autocast would not have cast it for those ops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _linear_parameters(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, name, parameter) of every floating weight and bias owned by an ``nn.Linear`` and by
    no other kind of module, each parameter once."""
    elsewhere: set[int] = set()
    found: dict[int, tuple[nn.Module, str, nn.Parameter]] = {}
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if isinstance(sub, nn.Linear):
                found.setdefault(id(p), (sub, name, p))
            else:
                elsewhere.add(id(p))
    return [entry for key, entry in found.items() if key not in elsewhere and entry[2].is_floating_point()]


def _accumulate_into(param: nn.Parameter):
    def hook(copy: torch.Tensor) -> None:
        grad = copy.grad
        copy.grad = None  # the 16-bit gradient lives only until it is added
        if param.grad is None:
            param.grad = grad.to(param.dtype)
        else:
            param.grad.add_(grad)

    return hook


class _DeferredGrads:
    """The (input, output gradient) rows of one Linear's backwards not yet summed into ``.grad``."""

    def __init__(self, owner: nn.Linear) -> None:
        # The fp32 parameters, taken before the copies replace them.
        self.weight, self.bias = owner.weight, owner.bias
        self.inputs: list[torch.Tensor] = []  # [rows, in] each
        self.grads: list[torch.Tensor] = []  # [rows, out] each
        self.rows = 0
        out_features, in_features = self.weight.shape
        # Rows at which the kept rows are as large as the weight: then the matmul, not the add into
        # .grad, dominates a flush, and deferring longer would only cost memory.
        self.max_rows = max(1, (out_features * in_features) // (out_features + in_features))

    def keep(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        self.inputs.append(x)
        self.grads.append(grad)
        self.rows += x.shape[0]
        if self.rows >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if not self.inputs:
            return
        x = self.inputs[0] if len(self.inputs) == 1 else torch.cat(self.inputs)  # [N, in]
        g = self.grads[0] if len(self.grads) == 1 else torch.cat(self.grads)  # [N, out]
        self.inputs, self.grads, self.rows = [], [], 0
        _add_grad(self.weight, g.t() @ x)  # [out, N] @ [N, in] -> [out, in], fp32 accumulation inside
        if self.bias is not None:
            _add_grad(self.bias, g.sum(0, dtype=torch.float32))  # [out]

    def clear(self) -> None:
        self.inputs, self.grads, self.rows = [], [], 0


def _all_tracked(owner: nn.Module, tracked: set[int]) -> bool:
    """Whether both of the Linear's parameters (those it has) get a tracked copy: only then may its
    backward skip autograd's weight gradients (a weight kept in fp32 must get its own)."""
    return all(id(p) in tracked for p in owner.parameters(recurse=False))


def _add_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


class _DeferredLinear(torch.autograd.Function):
    """``linear(x, weight, bias)`` whose backward returns the input's gradient only and hands the
    rows for the weight's gradient to ``pending`` (weight and bias get theirs from its flush)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pending: _DeferredGrads):
        x = x.to(weight.dtype)  # what autocast would cast it to (and save)
        ctx.save_for_backward(x, weight)
        ctx.pending = pending
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None  # [..., out] @ [out, in] -> [..., in]
        # [..., in] -> [rows, in] and [..., out] -> [rows, out]: one row per position
        ctx.pending.keep(x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1]))
        return grad_x, None, None, None


def _deferred_forward(owner: nn.Linear, pending: _DeferredGrads):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x.to(owner.weight.dtype), owner.weight, owner.bias)
        return _DeferredLinear.apply(x, owner.weight, owner.bias, pending)

    return forward


@contextlib.contextmanager
def linear_weight_copies(module: nn.Module, dtype: torch.dtype, *, defer: bool = False) -> Iterator[None]:
    """For the body: ``module``'s Linear weights replaced by ``dtype`` copies of their current values.

    The copies track gradients when grad mode is on at entry; backwards run inside the body add
    into the fp32 parameters' ``.grad`` (with ``defer``: by the end of the body, see the module
    docstring). On exit the parameters are back in place, whatever happened; deferred gradients
    are flushed only when the body ends normally. Weights must not change inside the body (a round
    ends before the optimizer steps)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    hooks = []
    pending: dict[int, _DeferredGrads] = {}
    overridden: list[nn.Module] = []
    track = torch.is_grad_enabled()
    entries = _linear_parameters(module)
    tracked = {id(p) for _, _, p in entries if track and p.requires_grad and p.dtype != dtype}
    deferred = {id(owner) for owner, _, _ in entries if defer and _all_tracked(owner, tracked)}
    try:
        for owner, name, param in entries:
            if param.dtype == dtype:
                continue
            copy = param.detach().to(dtype)
            if id(param) in tracked:
                copy.requires_grad_()
                if id(owner) in deferred:
                    # _DeferredLinear returns no gradient for the copy; the flush fills param.grad.
                    pending.setdefault(id(owner), _DeferredGrads(owner))
                else:
                    hooks.append(copy.register_post_accumulate_grad_hook(_accumulate_into(param)))
            # Straight into _parameters, as torch.func.functional_call does: Module.__setattr__
            # accepts only Parameters there, and a Parameter copy would be a second leaf to track.
            owner._parameters[name] = copy
            swapped.append((owner, name, param))
        for owner, _, _ in swapped:
            if id(owner) in pending and "forward" not in owner.__dict__:
                # An instance attribute shadows nn.Linear.forward for this round only.
                owner.forward = _deferred_forward(owner, pending[id(owner)])
                overridden.append(owner)
        yield
        for entry in pending.values():
            entry.flush()
    finally:
        for owner in overridden:
            del owner.forward
        for entry in pending.values():
            entry.clear()
        for owner, name, param in swapped:
            owner._parameters[name] = param
        for handle in hooks:
            handle.remove()

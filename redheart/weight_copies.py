"""16-bit copies of a module's ``nn.Linear`` weights, made once per round and put in place of the
fp32 parameters for the round, with their gradients added straight into the fp32 ``.grad``.

Why: under autocast every ``linear`` casts its fp32 weight to 16 bits; its backward makes a 16-bit
weight gradient, casts it to a new fp32 tensor and adds that into ``.grad`` — three passes over
memory the size of the weights per micro-batch. On the 200M model with a few dozen rows per
micro-batch that traffic, not arithmetic, is what a backward costs. A round here holds one 16-bit
leaf copy per weight; autograd hands its gradient to a hook that adds it into the fp32 ``.grad``
in one pass (``add_`` upcasts as it reads) and drops it. bf16 → fp32 is exact, so ``.grad`` holds
the same bits as with autocast's own casts (tests/unit/test_bf16_cpu.py); measured on 4 FFN blocks
of the ``base`` width, 4 micro-batches of 2 × 48, 1 thread: a round 1.7-1.8 s → 1.3-1.4 s.

Only parameters that no other kind of module shares are swapped: a weight tied to an embedding or
a layer norm must keep its fp32 value there (autocast would not have cast it for those ops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
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


@contextlib.contextmanager
def linear_weight_copies(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """For the body: ``module``'s Linear weights replaced by ``dtype`` copies of their current values.

    The copies track gradients when grad mode is on at entry; backwards run inside the body add
    into the fp32 parameters' ``.grad``. On exit the parameters are back in place, whatever
    happened. Weights must not change inside the body (a round ends before the optimizer steps)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    hooks = []
    track = torch.is_grad_enabled()
    try:
        for owner, name, param in _linear_parameters(module):
            if param.dtype == dtype:
                continue
            copy = param.detach().to(dtype)
            if track and param.requires_grad:
                copy.requires_grad_()
                hooks.append(copy.register_post_accumulate_grad_hook(_accumulate_into(param)))
            # Straight into _parameters, as torch.func.functional_call does: Module.__setattr__
            # accepts only Parameters there, and a Parameter copy would be a second leaf to track.
            owner._parameters[name] = copy
            swapped.append((owner, name, param))
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param
        for handle in hooks:
            handle.remove()

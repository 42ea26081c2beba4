"""bf16 on the CPU: the held weight copies, their deferred weight gradients and the short-sequence
attention kernel change speed, and the gradients only by where a sum is rounded to bf16."""

import contextlib

import torch

from redheart.model import EncoderLayer, ModelShape, _attention_kernel, _LayerStack
from redheart.precision import autocast, choose_precision, held_weight_casts
from redheart.weight_copies import linear_weight_copies

BF16 = choose_precision(True, "auto", False, "cpu")
FP32 = choose_precision(False, "auto", False, "cpu")


def _round(layer, xs, mask, held):
    """Forwards of all micro-batches, then their backwards (as 1F1B keeps several in flight);
    returns the outputs and every accumulated gradient."""
    layer.zero_grad(set_to_none=True)
    outs = []
    with held:
        for x in xs:
            with autocast(BF16, "cpu"):
                outs.append(layer(x, mask))
        for y in outs:
            y.float().sum().backward()
    return [y.detach() for y in outs], {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_held_weight_casts_give_the_same_bits_as_casting_per_micro_batch():
    """Without deferral (the CUDA path) the held copies change nothing, bit for bit."""
    torch.manual_seed(0)
    layer = EncoderLayer(64, 4, 128, 0.0)
    xs = [torch.randn(2, 16, 64) for _ in range(3)]
    mask = torch.ones(2, 16, dtype=torch.bool)
    plain = _round(layer, xs, mask, held_weight_casts(FP32, "cpu"))  # fp32 precision: nothing held
    for held in (held_weight_casts(BF16, "cpu"), _copies_added_per_micro_batch(layer)):
        ours = _round(layer, xs, mask, held)
        for a, b in zip(plain[0], ours[0]):
            assert torch.equal(a, b)
        assert plain[1].keys() == ours[1].keys()
        for name, grad in plain[1].items():
            assert torch.equal(grad, ours[1][name]), name
            assert grad.dtype == torch.float32


@contextlib.contextmanager
def _copies_added_per_micro_batch(layer):
    with torch.autocast("cpu", enabled=False), linear_weight_copies(layer, torch.bfloat16, defer=False):
        yield


def test_deferred_weight_gradients_agree_with_autocast_to_bf16_rounding():
    """bf16 on the CPU defers the Linear weight gradients: same outputs, gradients that differ
    from autocast's only by where the sum is rounded to bf16."""
    torch.manual_seed(0)
    layer = EncoderLayer(64, 4, 128, 0.0)
    xs = [torch.randn(2, 16, 64) for _ in range(3)]
    mask = torch.ones(2, 16, dtype=torch.bool)
    plain = _round(layer, xs, mask, held_weight_casts(FP32, "cpu"))
    ours = _round(layer, xs, mask, held_weight_casts(BF16, "cpu", layer))
    for a, b in zip(plain[0], ours[0]):
        assert torch.equal(a, b)
    for name, grad in plain[1].items():
        got = ours[1][name]
        assert got.dtype == torch.float32
        if "norm" in name:  # not a Linear: autograd's own gradient, same bits
            assert torch.equal(grad, got), name
        else:
            torch.testing.assert_close(got, grad, rtol=2e-2, atol=2e-2 * float(grad.abs().max())), name
    # The rounding differs, so the values do too: the deferred path really ran.
    assert not torch.equal(plain[1]["ffn_in.weight"], ours[1]["ffn_in.weight"])


def test_deferred_gradients_do_not_depend_on_the_schedule_or_the_split():
    """The pipeline's stages hold their own modules and run micro-batches in 1F1B order; the
    reference holds all modules and runs them one by one. Both must sum the same groups."""
    torch.manual_seed(0)
    a, b = EncoderLayer(64, 4, 128, 0.0), EncoderLayer(64, 4, 128, 0.0)
    model = torch.nn.ModuleList([a, b])
    xs = [torch.randn(2, 8 + 8 * (i % 3), 64) for i in range(7)]  # ragged micro-batches

    def run(interleaved: bool, split: bool):
        model.zero_grad(set_to_none=True)
        holds = [held_weight_casts(BF16, "cpu", m) for m in ((a, b) if split else (model,))]
        with contextlib.ExitStack() as stack:
            for hold in holds:
                stack.enter_context(hold)
            outs = []
            for x in xs:
                mask = torch.ones(x.shape[:2], dtype=torch.bool)
                with autocast(BF16, "cpu"):
                    outs.append(b(a(x, mask), mask))
                if not interleaved:
                    outs.pop().float().sum().backward()
                elif len(outs) == 3:  # a few in flight, backwards in micro-batch order
                    outs.pop(0).float().sum().backward()
            for y in outs:
                y.float().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = run(interleaved=False, split=False)
    for interleaved, split in ((True, True), (True, False), (False, True)):
        got = run(interleaved, split)
        for name, grad in reference.items():
            assert torch.equal(grad, got[name]), (name, interleaved, split)


def test_deferred_rows_are_flushed_when_they_reach_the_size_of_the_weight():
    lin = torch.nn.Linear(32, 32)  # 32 x 32 weight: flushed at 16 rows of 32 + 32 values
    weight = lin.weight
    kept, flushed = [], []
    with held_weight_casts(BF16, "cpu", lin):
        pending = lin.forward.__closure__[1].cell_contents  # the round's _DeferredGrads
        for _ in range(5):
            with autocast(BF16, "cpu"):
                lin(torch.randn(5, 32)).float().sum().backward()
            kept.append(pending.rows)
            flushed.append(weight.grad is not None)
    assert pending.max_rows == 16
    assert kept == [5, 10, 15, 0, 5]  # never more rows than the bound
    assert flushed == [False, False, False, True, True]
    assert "forward" not in lin.__dict__ and lin.weight is weight


def test_checkpointed_layers_get_the_same_deferred_gradients():
    torch.manual_seed(0)
    shape = ModelShape(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        ffn_size=128,
        vocab_size=64,
        max_seq_len=32,
        cpu_layers=2,
        dropout=0.0,
        init_seed=0,
    )
    grads = []
    x, mask = torch.randn(2, 16, 64), torch.ones(2, 16, dtype=torch.bool)
    for checkpointing in (False, True):
        stack = _LayerStack(shape, range(2), checkpointing)
        with held_weight_casts(BF16, "cpu", stack):
            with autocast(BF16, "cpu"):
                y = stack(x, mask)
            y.float().sum().backward()
        grads.append({n: p.grad for n, p in stack.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_evaluation_under_a_hold_runs_without_gradients():
    torch.manual_seed(0)
    layer = EncoderLayer(64, 4, 128, 0.0)
    x, mask = torch.randn(1, 8, 64), torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad(), held_weight_casts(BF16, "cpu", layer), autocast(BF16, "cpu"):
        held = layer(x, mask)
    with torch.no_grad(), autocast(BF16, "cpu"):
        plain = layer(x, mask)
    assert torch.equal(held, plain) and all(p.grad is None for p in layer.parameters())


def test_held_linear_copies_are_put_back_and_leave_no_hooks_behind():
    torch.manual_seed(0)
    layer = EncoderLayer(64, 4, 128, 0.0)
    before = dict(layer.named_parameters())
    x, mask = torch.randn(1, 8, 64), torch.ones(1, 8, dtype=torch.bool)
    try:
        with held_weight_casts(BF16, "cpu", layer):
            assert layer.ffn_in.weight.dtype == torch.bfloat16
            assert layer.norm1.weight.dtype == torch.float32  # not a Linear: autocast keeps it fp32
            raise RuntimeError("a round that fails")
    except RuntimeError:
        pass
    after = dict(layer.named_parameters())
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    with autocast(BF16, "cpu"):
        layer(x, mask).float().sum().backward()  # outside a hold: autocast's own casts, plain .grad
    assert layer.ffn_in.weight.grad.dtype == torch.float32


def test_a_weight_tied_to_another_kind_of_module_is_not_swapped():
    lin = torch.nn.Linear(8, 8)
    emb = torch.nn.Embedding(8, 8)
    emb.weight = lin.weight
    model = torch.nn.ModuleDict({"lin": lin, "emb": emb})
    with held_weight_casts(BF16, "cpu", model):
        assert lin.weight.dtype == torch.float32 and emb.weight is lin.weight
        assert lin.bias.dtype == torch.bfloat16


def test_weights_changed_after_the_held_region_are_cast_again():
    torch.manual_seed(0)
    layer = EncoderLayer(64, 4, 128, 0.0)
    x, mask = torch.randn(1, 8, 64), torch.ones(1, 8, dtype=torch.bool)
    with held_weight_casts(BF16, "cpu"), autocast(BF16, "cpu"):
        before = layer(x, mask)
    with torch.no_grad():
        layer.ffn_out.weight.mul_(2.0)
    with held_weight_casts(BF16, "cpu"), autocast(BF16, "cpu"):
        after = layer(x, mask)
    assert not torch.equal(before, after)


def test_short_bf16_sequences_use_the_math_kernel_and_agree_with_the_default():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 48, 16, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 1, 1, 48, dtype=torch.bool)
    mask[1, ..., 30:] = False
    with _attention_kernel(q):
        ours = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    default = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours.float(), default.float(), rtol=2e-2, atol=2e-2)
    # fp32 and long sequences keep torch's own choice (no context entered)
    assert type(_attention_kernel(q.float())).__name__ == "nullcontext"
    assert type(_attention_kernel(torch.zeros(1, 1, 256, 16, dtype=torch.bfloat16))).__name__ == "nullcontext"

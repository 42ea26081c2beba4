"""bf16 on the CPU: the held weight copies and the short-sequence attention kernel change speed only."""

import torch

from redheart.model import EncoderLayer, _attention_kernel
from redheart.precision import autocast, choose_precision, held_weight_casts

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
    torch.manual_seed(0)
    layer = EncoderLayer(64, 4, 128, 0.0)
    xs = [torch.randn(2, 16, 64) for _ in range(3)]
    mask = torch.ones(2, 16, dtype=torch.bool)
    plain = _round(layer, xs, mask, held_weight_casts(FP32, "cpu"))  # fp32 precision: nothing held
    for held in (held_weight_casts(BF16, "cpu"), held_weight_casts(BF16, "cpu", layer)):
        ours = _round(layer, xs, mask, held)
        for a, b in zip(plain[0], ours[0]):
            assert torch.equal(a, b)
        assert plain[1].keys() == ours[1].keys()
        for name, grad in plain[1].items():
            assert torch.equal(grad, ours[1][name]), name
            assert grad.dtype == torch.float32


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

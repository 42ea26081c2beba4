"""bf16 on the CPU: the held weight copies and the short-sequence attention kernel change speed only."""

import torch

from redheart.model import EncoderLayer, _attention_kernel
from redheart.precision import autocast, choose_precision, held_weight_casts

BF16 = choose_precision(True, "auto", False, "cpu")
FP32 = choose_precision(False, "auto", False, "cpu")


def _round(layer, xs, mask, held):
    """Forward+backward of each micro-batch; returns outputs and the accumulated weight gradient."""
    layer.zero_grad(set_to_none=True)
    outs = []
    with held:
        for x in xs:
            with autocast(BF16, "cpu"):
                y = layer(x, mask)
            y.float().sum().backward()
            outs.append(y.detach())
    return outs, layer.ffn_in.weight.grad.clone()


def test_held_weight_casts_give_the_same_bits_as_casting_per_micro_batch():
    torch.manual_seed(0)
    layer = EncoderLayer(64, 4, 128, 0.0)
    xs = [torch.randn(2, 16, 64) for _ in range(3)]
    mask = torch.ones(2, 16, dtype=torch.bool)
    plain = _round(layer, xs, mask, held_weight_casts(FP32, "cpu"))  # fp32 precision: nothing held
    held = _round(layer, xs, mask, held_weight_casts(BF16, "cpu"))
    for a, b in zip(plain[0], held[0]):
        assert torch.equal(a, b)
    assert torch.equal(plain[1], held[1])


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

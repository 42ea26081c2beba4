"""The Red Heart multi-task model, defined once and cut into two pipeline stages.

* CPU stage (:class:`CpuStageModule`): token + position embeddings and transformer layers
  ``[0, cpu_layers)``.
* GPU stage (:class:`GpuStageModule`): layers ``[cpu_layers, num_layers)``, the final norm, masked
  mean pooling and the heads (emotion, Bentham, judgment, regret: the registry in redheart/heads.py).

Composing the two is the whole model; the single-process reference does exactly that, so a
pipelined step and a single-process step run the same modules on the same numbers.

Weights are initialised per module from a generator seeded by ``(init_seed, global module name)``,
so each stage can build only its own part and still hold exactly the weights the whole model
would have: no stage ever materialises the other's layers.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from redheart import heads as head_registry
from redheart.data.schema import BENTHAM_KEYS, EMOTIONS, JUDGMENTS

if TYPE_CHECKING:  # avoid an import cycle: config imports this module lazily
    from redheart.config import ModelConfig

# The head facts live in the registry (redheart/heads.py); these names are kept for old imports.
NUM_EMOTIONS = len(EMOTIONS)
NUM_BENTHAM = len(BENTHAM_KEYS)  # 7 circumstances in [0, 1] + valence in [-1, 1]
NUM_JUDGMENTS = len(JUDGMENTS)
HEADS = head_registry.head_names()
"""The built-in heads' names (a snapshot at import; :func:`redheart.heads.head_names` sees registered ones)."""


@dataclass(frozen=True)
class ModelShape:
    """Everything both stages must agree on (fingerprinted in the handshake)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    vocab_size: int
    max_seq_len: int
    cpu_layers: int
    dropout: float
    init_seed: int

    @property
    def gpu_layers(self) -> int:
        return self.num_layers - self.cpu_layers


PRESETS: dict[str, dict[str, int]] = {
    # tests: well under 2M parameters, 4 layers so the split is meaningful
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, ffn_size=256, vocab_size=2048, max_seq_len=64),
    # the demo: learns visibly within minutes on 2 CPU cores
    "small": dict(hidden_size=128, num_layers=5, num_heads=4, ffn_size=512, vocab_size=4096, max_seq_len=64),
    # the original target_params = 200_000_000
    "base": dict(
        hidden_size=1024, num_layers=13, num_heads=16, ffn_size=4096, vocab_size=32000, max_seq_len=256
    ),
}


def count_parameters(shape: ModelShape) -> dict[str, int]:
    """Parameter counts without building the model (for planning and the 200M check)."""
    h, f, v = shape.hidden_size, shape.ffn_size, shape.vocab_size
    per_layer = (
        2 * (2 * h)  # two layer norms
        + (h * 3 * h + 3 * h)  # qkv projection
        + (h * h + h)  # output projection
        + (h * f + f)  # ffn in
        + (f * h + h)  # ffn out
    )
    embeddings = v * h + shape.max_seq_len * h
    heads = (h * h + h) + sum(h * spec.size + spec.size for spec in head_registry.heads())
    heads += 2 * h  # final norm
    cpu = embeddings + shape.cpu_layers * per_layer
    gpu = shape.gpu_layers * per_layer + heads
    return {"cpu_stage": cpu, "gpu_stage": gpu, "total": cpu + gpu, "per_layer": per_layer}


def _shape_for_target(target: int) -> dict[str, int]:
    """A sensible shape with about `target` parameters: widest hidden size whose depth stays >= 6."""
    best = None
    for hidden in (128, 192, 256, 384, 512, 768, 1024, 1280, 1536, 2048):
        vocab = 8192 if target < 60_000_000 else 32000
        seq = 128 if target < 60_000_000 else 256
        probe = ModelShape(hidden, 1, max(1, hidden // 64), 4 * hidden, vocab, seq, 0, 0.0, 0)
        counts = count_parameters(probe)
        fixed = counts["total"] - counts["per_layer"]
        layers = round((target - fixed) / counts["per_layer"])
        if layers >= 6 or best is None:
            best = dict(
                hidden_size=hidden,
                num_layers=max(2, layers),
                num_heads=max(1, hidden // 64),
                ffn_size=4 * hidden,
                vocab_size=vocab,
                max_seq_len=seq,
            )
        if layers < 6:
            break
    assert best is not None
    return best


def resolve_model_shape(cfg: ModelConfig, *, cpu_layers_override: int | None = None) -> ModelShape:
    """Preset / target_params / explicit fields -> a concrete, validated shape and split."""
    if cfg.preset == "custom":
        base: dict[str, int] = {}
    elif cfg.preset in PRESETS:
        base = dict(PRESETS[cfg.preset])
    else:
        raise ValueError(f"model.preset = {cfg.preset!r} is not one of {', '.join(PRESETS)} or custom")
    if cfg.target_params is not None:
        if cfg.target_params < 100_000:
            raise ValueError(f"model.target_params = {cfg.target_params} is too small (at least 100000)")
        base = _shape_for_target(cfg.target_params)
    for key in ("hidden_size", "num_layers", "num_heads", "ffn_size", "vocab_size", "max_seq_len"):
        value = getattr(cfg, key)
        if value is not None:
            base[key] = value
    missing = [
        k for k in ("hidden_size", "num_layers", "num_heads", "vocab_size", "max_seq_len") if k not in base
    ]
    if missing:
        raise ValueError(f'model.preset = "custom" needs {", ".join("model." + k for k in missing)}')
    base.setdefault("ffn_size", 4 * base["hidden_size"])
    for key, value in base.items():
        if value < 1:
            raise ValueError(f"model.{key} = {value} must be at least 1")
    if base["hidden_size"] % base["num_heads"]:
        raise ValueError(
            f"model.hidden_size = {base['hidden_size']} is not divisible by model.num_heads = {base['num_heads']}"
        )
    if base["vocab_size"] < 16:
        raise ValueError(f"model.vocab_size = {base['vocab_size']} is too small (at least 16)")
    layers = base["num_layers"]
    if cpu_layers_override is not None:
        cpu_layers = cpu_layers_override
    elif getattr(cfg, "stage_layers", None):
        cpu_layers = cfg.stage_layers[0]  # the first stage is the CPU stage
    elif cfg.cpu_layers is not None:
        cpu_layers = cfg.cpu_layers
    elif isinstance(cfg.gpu_layers_ratio, str):
        # "auto" is resolved by the orchestrator's profiler before the stages start; a stage
        # started without it falls back to the designed 40/60 split.
        cpu_layers = round(layers * 0.4)
    else:
        cpu_layers = round(layers * (1.0 - cfg.gpu_layers_ratio))
    if not 0 <= cpu_layers <= layers:
        raise ValueError(f"model.cpu_layers = {cpu_layers} must be in 0..{layers} (model.num_layers)")
    return ModelShape(
        hidden_size=base["hidden_size"],
        num_layers=layers,
        num_heads=base["num_heads"],
        ffn_size=base["ffn_size"],
        vocab_size=base["vocab_size"],
        max_seq_len=base["max_seq_len"],
        cpu_layers=cpu_layers,
        dropout=float(cfg.dropout),
        init_seed=cfg.init_seed,
    )


def stage_layer_ranges(cfg: ModelConfig) -> list[range]:
    """The global layer indices [a, b) of each pipeline stage: from model.stage_layers when set,
    else the two-stage split of :func:`resolve_model_shape`."""
    shape = resolve_model_shape(cfg)
    counts = list(cfg.stage_layers) or [shape.cpu_layers, shape.gpu_layers]
    if sum(counts) != shape.num_layers:
        raise ValueError(f"model.stage_layers = {counts} sums to {sum(counts)}, not {shape.num_layers}")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(a, a + n) for a, n in zip(starts, counts)]


# ----------------------------------------------------------------------------- modules


def _seed_for(init_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{init_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(module: nn.Module, init_seed: int, prefix: str) -> None:
    """Deterministic init of every sub-module, keyed by its global name (not by creation order)."""
    for name, sub in module.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        gen = torch.Generator().manual_seed(_seed_for(init_seed, full))
        if isinstance(sub, nn.Linear):
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.02)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.Embedding):
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.02)
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.fill_(1.0)
            sub.bias.zero_()


SHORT_SEQUENCE = 128
"""Up to this length, bf16 attention on the CPU runs torch's math kernel (see _attention_kernel)."""


def _attention_kernel(q: torch.Tensor):
    """The scaled-dot-product kernel for ``q`` [B, heads, T, D].

    torch picks its flash kernel on the CPU whenever it can. In bf16 on short sequences its backward
    is three times slower than the plain math kernel (measured on 2 cores, 1 thread, batch 2 x 16
    heads x 64: T = 48: 9.8 ms vs 2.7 ms forward+backward; T = 128: 24 vs 12 ms; T = 256: 35 vs 42
    ms), and the bundled texts are ~40 tokens: there it was 11% of the CPU stage's step. In fp32
    and on CUDA torch's own choice stands."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= SHORT_SEQUENCE:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).split(h, dim=-1)  # 3 x [B, T, H]
        # [B, T, H] -> [B, heads, T, H/heads]
        q = q.view(b, t, self.heads, h // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, h // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, h // self.heads).transpose(1, 2)
        # key_mask [B, T] bool (True = real token) -> [B, 1, 1, T], broadcast over heads and queries
        attn_mask = key_mask[:, None, None, :]
        with _attention_kernel(q):
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )  # [B, heads, T, H/heads]
        y = y.transpose(1, 2).reshape(b, t, h)  # [B, T, H]
        return self.proj(y)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, dropout)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_mask))
        x = x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.norm2(x)))))
        return x


class _LayerStack(nn.Module):
    """Layers keyed by their global index, so parameter names are the same in any split."""

    def __init__(self, shape: ModelShape, indices: range, checkpointing: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(
            {
                str(i): EncoderLayer(shape.hidden_size, shape.num_heads, shape.ffn_size, shape.dropout)
                for i in indices
            }
        )
        self.checkpointing = checkpointing
        for i in indices:
            init_weights(self.layers[str(i)], shape.init_seed, f"layers.{i}")

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            if self.checkpointing and self.training and torch.is_grad_enabled():
                # preserve_rng_state keeps dropout identical in the recomputation.
                x = torch.utils.checkpoint.checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
        return x


class _EmbeddingAccumulate(torch.autograd.Function):
    """Token lookup whose backward adds the rows it used into ``weight.grad`` in place.

    torch's embedding backward builds a dense [vocab, hidden] gradient for every backward call and
    then adds it into ``.grad``: for the `base` model 131 MB written twice per micro-batch, ~0.15 s
    on 2 cores, eight times per step, on the CPU stage that sets the pace of the pipeline. The rows
    a micro-batch touches are a few dozen; ``index_add_`` into one buffer allocated once per step
    does the same sum at a fraction of the cost. The buffer is an ordinary dense ``.grad``, so
    clipping, norms and AdamW see exactly what they would with the stock backward.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)  # [B, T, H]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        # [B, T, H] -> [B*T, H], one row per looked-up id
        weight.grad.index_add_(
            0, ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]).to(weight.grad.dtype)
        )
        return None, None  # the weight's gradient is already in place


class StageModule(nn.Module):
    """One pipeline stage: global layers ``layers`` (a range [a, b)), with the embeddings in front
    when it is the first stage and the norm, pooler and heads behind when it is the last.

    forward(inputs, mask [B,T]) -> the first stage takes input_ids [B,T], any other hidden [B,T,H];
    the last returns the head outputs, any other hidden [B,T,H]. Sub-modules are created in the
    order the two-stage model always created them (embeddings, layers, norm, pooler, heads), so
    parameter names, their order and the global RNG draws of nn.Linear's own init are the same for
    every split, every number of stages, and the whole model as one stage.
    """

    def __init__(
        self, shape: ModelShape, layers: range, *, embeddings: bool, heads: bool, checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.shape = shape
        self.has_embeddings, self.has_heads = embeddings, heads
        h = shape.hidden_size
        if embeddings:
            self.token = nn.Embedding(shape.vocab_size, h)
            self.position = nn.Embedding(shape.max_seq_len, h)
            self.dropout = nn.Dropout(shape.dropout)
            init_weights(self.token, shape.init_seed, "embeddings.token")
            init_weights(self.position, shape.init_seed, "embeddings.position")
        self.stack = _LayerStack(shape, layers, checkpointing)
        if heads:
            self.norm = nn.LayerNorm(h)
            self.pooler = nn.Linear(h, h)
            # One linear layer per registered head, created in registry order (emotion, bentham,
            # judgment, regret, ...): parameter names heads.<name>.*, their order, and the global RNG
            # that nn.Linear's own init draws from all stay those of the four-head model.
            self.head_specs = head_registry.heads()
            for spec in self.head_specs:
                self.add_module(spec.name, nn.Linear(h, spec.size))
            for name in ("norm", "pooler", *(spec.name for spec in self.head_specs)):
                init_weights(getattr(self, name), shape.init_seed, f"heads.{name}")

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        x = self._embed(inputs) if self.has_embeddings else inputs  # [B, T, H]
        x = self.stack(x, mask)  # [B, T, H]
        return self._heads(x, mask) if self.has_heads else x

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        if t > self.shape.max_seq_len:
            raise ValueError(
                f"input_ids has {t} positions, the model's max_seq_len is {self.shape.max_seq_len}"
            )
        positions = torch.arange(t, device=input_ids.device)  # [T]
        if torch.is_grad_enabled() and self.token.weight.requires_grad:
            tokens = _EmbeddingAccumulate.apply(input_ids, self.token.weight)  # [B, T, H]
        else:
            tokens = self.token(input_ids)  # [B, T, H]
        x = tokens + self.position(positions)[None]  # [B, T, H]
        return self.dropout(x)

    def _heads(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(hidden)  # [B, T, H]
        weights = mask.to(x.dtype)[..., None]  # [B, T, 1]
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, H]
        pooled = torch.tanh(self.pooler(pooled))  # [B, H]
        # emotion_logits [B, 6], bentham [B, 8] (activated), judgment_logits [B, 5], regret [B] >= 0
        computed: dict[str, torch.Tensor] = {}
        # In forward_order (Bentham first): see HeadSpec.forward_order; returned in model order.
        for spec in sorted(self.head_specs, key=lambda s: s.forward_order):
            raw = getattr(self, spec.name)(pooled)  # [B, size]
            computed[spec.output] = raw if spec.activation is None else spec.activation(raw)
        return {spec.output: computed[spec.output] for spec in self.head_specs}

    def global_named_parameters(self):
        for name, p in self.named_parameters():
            yield _global_name(name), p


class CpuStageModule(StageModule):
    """Embeddings + the first `cpu_layers` layers. forward(input_ids [B,T], mask [B,T]) -> [B,T,H]."""

    def __init__(self, shape: ModelShape, *, checkpointing: bool = False) -> None:
        super().__init__(
            shape, range(0, shape.cpu_layers), embeddings=True, heads=False, checkpointing=checkpointing
        )


class GpuStageModule(StageModule):
    """Remaining layers + norm + pooling + heads. forward(hidden [B,T,H], mask [B,T]) -> head outputs."""

    def __init__(self, shape: ModelShape, *, checkpointing: bool = False) -> None:
        super().__init__(
            shape,
            range(shape.cpu_layers, shape.num_layers),
            embeddings=False,
            heads=True,
            checkpointing=checkpointing,
        )


def _global_name(local: str) -> str:
    """Module-local parameter name -> the name it has in the whole model (same in every split)."""
    if local.startswith("stack.layers."):
        return "layers." + local[len("stack.layers.") :]
    if local.startswith(("token.", "position.")):
        return "embeddings." + local
    return "heads." + local


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from parts (dropout per (seed, step, micro-batch, stage))."""
    return _seed_for(0, ":".join(str(p) for p in parts))


CUDA_CONTEXT_BYTES = 600 * 2**20
"""The CUDA context, cuBLAS / cuDNN workspaces and loaded kernels of a torch process: measured at
300-600 MiB from Turing to Hopper (CUDA 12, lazy module loading). Memory the allocator never sees,
so it counts against the card but not against ``max_memory_allocated``."""

CUDA_WORKSPACE_BYTES = 64 * 2**20
"""cuBLAS / cuBLASLt workspaces: taken from torch's caching allocator (so inside
``max_memory_allocated``), 8-32 MiB each by default depending on the architecture."""


def estimate_stage_memory_bytes(
    shape: ModelShape,
    stage: str,
    micro_batch: int,
    in_flight: int,
    bytes_per_param: int = 4,
    activation_bytes: int = 4,
    *,
    checkpointing: bool = False,
    autocast: bool = False,
    cuda: bool = False,
) -> dict[str, int]:
    """Training-memory estimate of one stage: weights + grads + AdamW (2 states) + activations.

    ``in_flight`` micro-batches keep their activations until their backward (1F1B: p - rank, plus
    the regret look-ahead). With ``checkpointing`` a layer keeps only its input (fp32 residual
    stream) and one layer's activations exist at a time, while it is recomputed in backward.
    ``autocast`` adds torch's cache of 16-bit copies of the weights (kept for one forward).
    ``cuda`` adds the cuBLAS workspaces and the CUDA context (which the caching allocator does not
    count)."""
    counts = count_parameters(shape)
    params = counts["cpu_stage" if stage == "cpu" else "gpu_stage"]
    layers = shape.cpu_layers if stage == "cpu" else shape.gpu_layers
    weights = params * bytes_per_param
    grads = params * 4
    optimizer = params * 8
    t, h, f = shape.max_seq_len, shape.hidden_size, shape.ffn_size
    # per layer per sample: ~ residuals, norms, qkv, attention probs, ffn hidden (saved for backward)
    per_layer_sample = (8 * t * h + 2 * t * f + shape.num_heads * t * t) * activation_bytes
    if checkpointing:
        kept = in_flight * micro_batch * max(layers, 1) * t * h * 4  # each layer's checkpointed input
        activations = kept + micro_batch * per_layer_sample  # the one layer being recomputed
    else:
        activations = in_flight * micro_batch * max(layers, 1) * per_layer_sample
    autocast_cache = params * 2 if autocast else 0
    context = CUDA_CONTEXT_BYTES if cuda else 0
    workspace = CUDA_WORKSPACE_BYTES if cuda else 0
    total = weights + grads + optimizer + activations + autocast_cache + workspace + context
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "autocast_cache": autocast_cache,
        "cuda_workspace": workspace,
        "cuda_context": context,
        "total": total,
        "parameters": params,
    }

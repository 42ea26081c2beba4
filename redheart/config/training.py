"""The sections of what is trained: [model], [data], [train] and [checkpoint], each with its checks.

Every field has a docstring saying what it does (docs/config.md is generated from them). A
section's ``check(fail)`` holds the rules that need only that section; rules that combine sections
are in validation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from redheart.config.errors import Fail


@dataclass
class ModelConfig:
    preset: str = "small"
    """Model shape preset: tiny (<2M, tests), small (the demo), base (~200M), or custom."""
    target_params: int | None = None
    """Pick a shape with about this many parameters (overrides the preset's shape)."""
    hidden_size: int | None = None
    """Width of the transformer (None: from the preset / target_params)."""
    num_layers: int | None = None
    """Number of transformer layers over both stages."""
    num_heads: int | None = None
    """Attention heads per layer; must divide hidden_size."""
    ffn_size: int | None = None
    """Feed-forward inner width (None: 4 x hidden_size)."""
    vocab_size: int | None = None
    """Tokenizer / embedding vocabulary size."""
    max_seq_len: int | None = None
    """Longest token sequence; longer texts are truncated and counted."""
    dropout: float = 0.0
    """Dropout probability. Deterministic per (seed, step, micro-batch, stage), so pipelined == single process."""
    gpu_layers_ratio: float | str = 0.6
    """Share of transformer layers on the GPU stage (0.6: 40% on the CPU, as designed), or "auto"."""
    cpu_layers: int | None = None
    """Explicit number of transformer layers on the CPU stage (overrides gpu_layers_ratio)."""
    stage_layers: list[int] = field(default_factory=list)
    """Transformer layers of each pipeline stage in order, e.g. [1, 2, 2]: the first is the CPU stage (embeddings + its layers, may be 0), the rest GPU stage processes (at least 1 each, the last holds the heads); the sum must be num_layers. Empty: two stages split by cpu_layers / gpu_layers_ratio. More than two: the GPU stage processes take gpu_stage.rank 1, 2, ... (the local launcher sets it)."""
    init_seed: int = 0
    """Seed of the weight initialisation; every stage initialises its own layers from it."""
    init_from: str = ""
    """An exported model folder (redheart-export) to start from instead of the seeded initialisation: each stage loads its own parameters from its model.safetensors by global name, so the split may differ from the one it was trained at; the shape must match this section, and the run uses the folder's tokenizer. Empty: seeded initialisation."""

    def check(self, fail: Fail) -> None:
        """This section's own rules: the split ratio, dropout, and a shape the presets can resolve."""
        if isinstance(self.gpu_layers_ratio, str):
            if self.gpu_layers_ratio != "auto":
                fail(
                    "model",
                    "gpu_layers_ratio",
                    f'model.gpu_layers_ratio = {self.gpu_layers_ratio!r} must be a number in (0, 1] or "auto"',
                )
        elif not 0 < self.gpu_layers_ratio <= 1:
            fail(
                "model",
                "gpu_layers_ratio",
                f"model.gpu_layers_ratio = {self.gpu_layers_ratio} must be in (0, 1]",
            )
        self._check_stage_layers(fail)
        if not 0 <= self.dropout < 1:
            fail("model", "dropout", f"model.dropout = {self.dropout} must be in [0, 1)")
        try:
            # Imported when checked: redheart.model pulls in torch, which a config alone does not need.
            from redheart.model import resolve_model_shape

            resolve_model_shape(self)
        except ValueError as exc:
            fail("model", "preset", str(exc))

    def _check_stage_layers(self, fail: Fail) -> None:
        """stage_layers: at least two stages, a CPU stage of >= 0 layers, GPU stages of >= 1, the
        model's depth in total, no contradicting cpu_layers."""
        k = self.stage_layers
        if not k:
            return
        if len(k) < 2:
            fail("model", "stage_layers", f"model.stage_layers = {k} needs at least two stages (CPU + GPU)")
        if k[0] < 0:
            fail("model", "stage_layers", f"model.stage_layers[0] = {k[0]} (the CPU stage) must be >= 0")
        for i, n in enumerate(k[1:], start=1):
            if n < 1:
                fail(
                    "model",
                    "stage_layers",
                    f"model.stage_layers[{i}] = {n}: every GPU stage needs at least 1 layer",
                )
        if self.cpu_layers is not None and self.cpu_layers != k[0]:
            fail(
                "model",
                "stage_layers",
                f"model.stage_layers = {k} puts {k[0]} layers on the CPU stage but model.cpu_layers = "
                f"{self.cpu_layers} (fix: drop model.cpu_layers)",
            )
        try:
            from redheart.model import resolve_model_shape

            layers = resolve_model_shape(self).num_layers
        except ValueError:
            return  # the shape's own error is reported below
        if sum(k) != layers:
            fail(
                "model",
                "stage_layers",
                f"model.stage_layers = {k} sums to {sum(k)}, the model has {layers} layers (model.num_layers)",
            )


@dataclass
class DataConfig:
    path: str = "runs/data/scenarios.jsonl"
    """JSONL scenarios (see docs/data.md). Relative paths are relative to the working directory."""
    generate_if_missing: bool = True
    """When `path` does not exist, write the bundled generated corpus there first."""
    generated_count: int = 28882
    """Scenarios the bundled generator writes (the original corpus size)."""
    max_scenarios: int = 0
    """Use only the first N scenarios of the file (0: all)."""
    validation_fraction: float = 0.1
    """Share of scenarios held out for validation (split by a hash of the id); unused with validation_path."""
    validation_path: str = ""
    """A separate JSONL file to validate on (every scenario of it); the whole of `path` is then the training split. Empty: hold out validation_fraction of `path`."""
    seed: int = 0
    """Seed of the split and of the per-epoch shuffling."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per `source` (the original data_folder_weights); unlisted sources weigh 1."""
    skip_invalid: bool = False
    """Skip invalid lines (reporting how many) instead of refusing to start."""
    tokenizer_path: str = ""
    """A trained tokenizer JSON to reuse; empty: train one from the training split into the run directory."""
    length_bucketing: bool = False
    """Group samples of similar length into the same optimizer step (less padding), deterministic
    from (seed, epoch) so resume and --verify stay exact."""
    bucket_window: int = 64
    """With length_bucketing: optimizer steps' worth of samples sorted by length together; the steps
    of a window are then shuffled (larger: less padding, less randomness in step composition)."""

    def check(self, fail: Fail) -> None:
        """This section's own rules: the split, the bucketing window, a separate validation file."""
        if not 0 < self.validation_fraction < 1:
            fail(
                "data",
                "validation_fraction",
                f"data.validation_fraction = {self.validation_fraction} must be in (0, 1)",
            )
        if self.max_scenarios < 0:
            fail("data", "max_scenarios", f"data.max_scenarios = {self.max_scenarios} must be >= 0")
        if self.bucket_window < 1:
            fail(
                "data",
                "bucket_window",
                f"data.bucket_window = {self.bucket_window} must be at least 1 (optimizer steps per window)",
            )
        if self.validation_path and Path(self.validation_path).resolve() == Path(self.path).resolve():
            fail(
                "data",
                "validation_path",
                f"data.validation_path = {self.validation_path!r} is data.path itself: validating on the "
                "training data measures nothing (fix: a separate file, or leave it empty for the hash split)",
            )
        for source, weight in self.source_weights.items():
            if weight < 0:
                fail("data", "source_weights", f"data.source_weights.{source} = {weight} must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    batch_size: int = 8
    """Samples per accumulation round (split into micro-batches)."""
    micro_batch_size: int = 0
    """Samples per micro-batch; batch_size / micro_batch_size micro-batches flow through the pipeline.
    0 (auto): the largest divisor of batch_size that still gives at least 4 micro-batches per
    pipeline stage (1F1B's bubble is (p-1)/(m+p-1): 11% at m = 8 for 2 stages, 33% at m = 2)."""
    pad_to_multiple_of: int = 8
    """Each micro-batch is padded only to its longest sequence, rounded up to this multiple
    (0: pad every sample to model.max_seq_len, as before length-aware batching)."""
    gradient_accumulation_steps: int = 1
    """Accumulation rounds per optimizer step; the effective batch is batch_size x this."""
    learning_rate: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler_type: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear or constant."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to learning_rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of learning_rate (cosine / linear)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip over both stages (0: no clipping)."""
    use_mixed_precision: bool = False
    """Mixed precision: bf16 autocast on CPU; on CUDA as train.mixed_precision_dtype chooses."""
    mixed_precision_dtype: str = "auto"
    """Autocast dtype on CUDA: auto (bf16 where the GPU has it natively, compute capability >= 8.0, else fp16 with loss scaling), bf16 (refused below 8.0, where it is emulated) or fp16."""
    allow_tf32: bool = True
    """Let fp32 matmuls use TF32 tensor cores on GPUs with compute capability >= 8.0."""
    max_consecutive_skips: int = 32
    """fp16: stop the run after this many consecutive steps skipped for overflow (0: no limit)."""
    initial_loss_scale: float = 65536.0
    """fp16: the dynamic loss scale's start (halved on overflow, doubled after 2000 good steps)."""
    schedule: str = "1f1b"
    """Pipeline schedule: 1f1b or gpipe."""
    seed: int = 0
    """Seed of dropout and any other randomness of training."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Weight per head loss (emotion, bentham, judgment, regret); unlisted heads weigh 1."""
    log_every_n_steps: int = 5
    """A log line (and report entry) every N optimizer steps."""
    eval_every_epoch: bool = True
    """Evaluate on the validation split after each epoch (always at the end)."""

    def check(self, fail: Fail) -> None:
        """This section's own rules (the head names of loss_weights are checked in validation.py)."""
        if self.pad_to_multiple_of < 0:
            fail(
                "train",
                "pad_to_multiple_of",
                f"train.pad_to_multiple_of = {self.pad_to_multiple_of} must be >= 0 (0: pad to model.max_seq_len)",
            )
        for key in (
            "epochs",
            "batch_size",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "log_every_n_steps",
        ):
            if getattr(self, key) < 1:
                fail("train", key, f"train.{key} = {getattr(self, key)} must be at least 1")
        if self.max_steps < 0:
            fail("train", "max_steps", f"train.max_steps = {self.max_steps} must be >= 0 (0: no limit)")
        self._check_micro_batches(fail)
        self._check_optimizer(fail)

    def _check_micro_batches(self, fail: Fail) -> None:
        if self.batch_size % self.micro_batch_size:
            fail(
                "train",
                "batch_size",
                f"train.batch_size = {self.batch_size} is not divisible by train.micro_batch_size = {self.micro_batch_size} "
                f"(fix: make batch_size a multiple of micro_batch_size, e.g. {self.micro_batch_size * max(2, self.batch_size // self.micro_batch_size)})",
            )
        num_stages = 2
        if self.batch_size // self.micro_batch_size < num_stages:
            fail(
                "train",
                "micro_batch_size",
                f"{self.batch_size // self.micro_batch_size} micro-batches (batch_size {self.batch_size} / micro_batch_size "
                f"{self.micro_batch_size}) is fewer than the {num_stages} pipeline stages, so one stage would always idle "
                f"(fix: micro_batch_size <= {self.batch_size // num_stages})",
            )

    def _check_optimizer(self, fail: Fail) -> None:
        if self.learning_rate <= 0:
            fail("train", "learning_rate", f"train.learning_rate = {self.learning_rate} must be > 0")
        if self.weight_decay < 0:
            fail("train", "weight_decay", f"train.weight_decay = {self.weight_decay} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("train", "min_lr_ratio", f"train.min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        if not self.initial_loss_scale >= 1.0 or self.initial_loss_scale == float("inf"):
            fail(
                "train",
                "initial_loss_scale",
                f"train.initial_loss_scale = {self.initial_loss_scale} must be a finite number >= 1",
            )
        if self.max_consecutive_skips < 0:
            fail(
                "train",
                "max_consecutive_skips",
                f"train.max_consecutive_skips = {self.max_consecutive_skips} must be >= 0 (0: no limit)",
            )
        if self.max_grad_norm < 0:
            fail(
                "train",
                "max_grad_norm",
                f"train.max_grad_norm = {self.max_grad_norm} must be >= 0 (0: no clipping)",
            )


@dataclass
class CheckpointConfig:
    save_checkpoint_every: int = 20
    """Coordinated checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a new manifest is written."""
    directory: str = ""
    """Where checkpoints go (empty: <output_dir>/checkpoints)."""
    max_load_mb: int = 4096
    """Refuse to load a checkpoint file above this size (MiB)."""

    def check(self, fail: Fail) -> None:
        """This section's own rules."""
        if self.save_checkpoint_every < 0:
            fail(
                "checkpoint",
                "save_checkpoint_every",
                f"checkpoint.save_checkpoint_every = {self.save_checkpoint_every} must be >= 0",
            )
        if self.keep_last < 1:
            fail("checkpoint", "keep_last", f"checkpoint.keep_last = {self.keep_last} must be >= 1")

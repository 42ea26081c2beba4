"""Scenario data for Red Heart: schema and loader, synthetic generator, tokenizer, tensors, metrics.

Typical use::

    from redheart.data import (load_jsonl, split_train_validation, train_tokenizer,
                               encode_dataset, epoch_order, batches_per_epoch, compute_metrics)

    scenarios = load_jsonl("data/scenarios.jsonl").scenarios
    train, val = split_train_validation(scenarios, validation_fraction=0.1, seed=0)
    tokenizer = train_tokenizer((s.text for s in train), vocab_size=4096, path="run/tokenizer.json")
    train_ds = encode_dataset(train, tokenizer, max_length=96)
    order = epoch_order(train_ds.sources, epoch=0, seed=0)

See ``docs/data.md`` for the file format.
"""

from redheart.data.dataset import (
    IGNORE_INDEX,
    EncodedDataset,
    batches_per_epoch,
    bucket_by_length,
    encode_dataset,
    epoch_order,
    split_train_validation,
)
from redheart.data.evaluation import baseline_metrics, compute_metrics
from redheart.data.schema import (
    BENTHAM_KEYS,
    EMOTIONS,
    JUDGMENTS,
    DataError,
    LoadResult,
    Scenario,
    load_jsonl,
    scenario_from_dict,
)
from redheart.data.tokenizer import (
    CLS_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    EncodedTexts,
    encode_texts,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)

# The generator is re-exported lazily so `python -m redheart.data.generate` does not import the
# module twice (runpy warns when a package __init__ already imported the module it is running).
_LAZY = {"DEFAULT_COUNT", "generate_scenarios", "write_jsonl"}


def __getattr__(name: str) -> object:
    if name == "LABEL_KEYS":  # the head registry's, read when asked (see redheart.data.dataset)
        from redheart.data import dataset

        return dataset.LABEL_KEYS
    if name in _LAZY:
        from redheart.data import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'redheart.data' has no attribute {name!r}")


__all__ = [
    "BENTHAM_KEYS",
    "CLS_ID",
    "DEFAULT_COUNT",
    "EMOTIONS",
    "IGNORE_INDEX",
    "JUDGMENTS",
    "LABEL_KEYS",
    "PAD_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "DataError",
    "EncodedDataset",
    "EncodedTexts",
    "LoadResult",
    "Scenario",
    "baseline_metrics",
    "batches_per_epoch",
    "compute_metrics",
    "encode_dataset",
    "encode_texts",
    "bucket_by_length",
    "epoch_order",
    "generate_scenarios",
    "load_jsonl",
    "load_tokenizer",
    "save_tokenizer",
    "scenario_from_dict",
    "split_train_validation",
    "tokenizer_sha256",
    "train_tokenizer",
    "write_jsonl",
]

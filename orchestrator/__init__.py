"""The orchestrator: drives optimizer steps across the pipeline stages.

Python API (mirrors the original prototype)::

    from orchestrator import HybridConfig, HybridDistributedTrainer
    report, checkpoint = HybridDistributedTrainer(HybridConfig(epochs=1)).train()
"""

from redheart.config import HybridConfig

__all__ = ["HybridConfig", "HybridDistributedTrainer"]


def __getattr__(name):
    # Lazy: importing the package must not pull in the whole trainer (and torch) for the CLI's --help.
    if name == "HybridDistributedTrainer":
        from orchestrator.trainer import HybridDistributedTrainer

        return HybridDistributedTrainer
    raise AttributeError(name)

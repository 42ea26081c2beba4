"""What a run keeps for its exported model: the baselines file and the model.init_from check.

* ``baselines.safetensors`` goes into every checkpoint (its sha256 in the manifest): the train
  split's labels, the bag-of-words fit and the run's mean regret target, so ``redheart-export``
  carries them into the model folder and ``redheart-evaluate`` reports the same baselines as the
  run's report without the training data.
* ``model.init_from``: the folder must hold this model's shape (any split); the stages receive
  ``{"path", "sha256"}`` in StartRun and each loads its own parameters when it builds its part.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from redheart import model_folder
from redheart.config import HybridConfig
from redheart.model import resolve_model_shape

log = logging.getLogger(__name__)


def fit_bow(config: HybridConfig, data):
    from redheart.data.bow_baseline import fit_bow_baseline

    start = time.perf_counter()
    bow = fit_bow_baseline(
        data.train.input_ids,
        data.train.attention_mask,
        data.train_labels,
        regrets_per_step=config.regret.regrets_per_step,
        bentham_per_regret=config.regret.bentham_per_regret,
    )
    log.info(
        "fitted the bag-of-words baseline (%d token features, %d heads) on %d training scenarios in %.1fs",
        bow.features.numel(),
        len(bow.weights),
        len(data.train),
        time.perf_counter() - start,
    )
    return bow


def write_baselines(directory: Path, data, bow, regret_target_mean: float | None) -> dict[str, str]:
    from safetensors.torch import save_file

    from redheart.data.bow_baseline import baselines_tensors

    path = directory / model_folder.BASELINES_FILE
    save_file(baselines_tensors(data.train_labels, bow, regret_target_mean), str(path))
    return {"file": path.name, "sha256": model_folder.sha256_file(path)}


def check_init_from(config: HybridConfig) -> dict[str, str] | None:
    """The StartRun spec of model.init_from, or None; ModelFolderError (a ValueError) names the problem."""
    if not config.model.init_from:
        return None
    folder = Path(config.model.init_from).resolve()
    folder_config = model_folder.read_config(folder)
    model_folder.check_shape(
        folder_config, resolve_model_shape(config.model), where=f"model.init_from = {str(folder)!r}"
    )
    model_folder.verify_file(folder, folder_config, model_folder.TOKENIZER_FILE)
    return {"path": str(folder), "sha256": folder_config["files"][model_folder.WEIGHTS_FILE]["sha256"]}

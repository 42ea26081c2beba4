"""Use a trained Red Heart model in one process, no services: export, predict, evaluate.

    from inference import RedHeartModel, export_checkpoint

    export_checkpoint("runs/demo/checkpoints", "runs/demo/model")   # = redheart-export
    model = RedHeartModel.from_pretrained("runs/demo/model")
    predictions = model.predict(["I lied to my friend about the party."])
    report = model.evaluate("my_test_set.jsonl")                     # = redheart-evaluate

The folder format is docs/model-format.md.
"""

__all__ = ["RedHeartModel", "Prediction", "export_checkpoint", "ModelFolderError"]


def __getattr__(name):
    # Lazy: `redheart-predict --help` must not wait for torch.
    if name in ("RedHeartModel", "Prediction"):
        from inference import predictor

        return getattr(predictor, name)
    if name == "export_checkpoint":
        from inference.export import export_checkpoint

        return export_checkpoint
    if name == "ModelFolderError":
        from redheart.model_folder import ModelFolderError

        return ModelFolderError
    raise AttributeError(name)

"""One pipeline stage, split by job (issue 13). Torch side, no gRPC:

* ``errors.py`` -- StageError / StepAborted (the kind maps to a gRPC status in the servicer);
* ``mailbox.py`` -- tensors pushed by the peer, waiting for the round that takes them;
* ``contracts.py`` -- tensor kinds, the PeerLink and StagePart protocols, AttemptLink, and the plan,
  context and result of a round;
* ``checks.py`` -- checks of StartRun settings and round plans, step and learning-rate limits;
* ``optimizer.py`` -- build_optimizer (AdamW, decay on matrices only);
* ``runtime.py`` -- StageRuntime, the state machine: start a run, the control lock, push checks, apply, abort;
* ``rounds.py`` -- running a round's schedule actions and evaluation passes (mixin of StageRuntime);
* ``state_io.py`` -- SaveState / LoadState and init_from weights (mixin of StageRuntime);
* ``shards.py`` -- the checkpoint shard format: files, sha256, atomic writes, checked reads.

No imports here: import from the module that holds the name.
"""

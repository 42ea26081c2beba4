"""One pipeline stage, split by job; shared by the CPU and GPU stage processes (cpu_stage/, gpu_stage/).

Torch side, no gRPC:

* ``errors.py`` -- ErrorKind / ErrorReason / StageError / StepAborted (typed: one kind per gRPC status);
* ``mailbox.py`` -- tensors pushed by the peer, waiting for the round that takes them;
* ``contracts.py`` -- tensor kinds, the PeerLink and StagePart protocols, AttemptLink, and the plan,
  context and result of a round;
* ``checks.py`` -- checks of StartRun settings and round plans, step and learning-rate limits;
* ``optimizer.py`` -- build_optimizer (AdamW, decay on matrices only);
* ``runtime.py`` -- StageRuntime, the state machine: start a run, the control lock, push checks, apply, abort;
* ``rounds.py`` -- running a round's schedule actions and evaluation passes (mixin of StageRuntime);
* ``state_io.py`` -- SaveState / LoadState and init_from weights (mixin of StageRuntime);
* ``shards.py`` -- the checkpoint shard format: files, sha256, atomic writes, checked reads.

gRPC side:

* ``wire.py`` -- messages in and out, the gRPC status of each failure;
* ``peer_link.py`` -- the sender to the neighbouring stage;
* ``servicer.py`` -- PipelineStage: decode, delegate, answer;
* ``server.py`` -- the server factory;
* ``metrics.py`` -- the stage metrics factory;
* ``main.py`` -- the stage process main, on redheart/service_main.py.

No imports here: import from the module that holds the name.
"""

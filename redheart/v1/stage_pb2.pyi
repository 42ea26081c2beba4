from redheart.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("stage_rank", "num_stages", "stage_name", "device", "model_fingerprint", "model_settings_json", "num_parameters", "layer_range", "version", "current_run_id", "next_step", "wall_clock", "precision", "device_name", "compute_capability", "device_total_memory_bytes", "device_free_memory_bytes", "memory_budget_bytes")
    STAGE_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    STAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_RANGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_CLOCK_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    stage_rank: int
    num_stages: int
    stage_name: str
    device: str
    model_fingerprint: str
    model_settings_json: str
    num_parameters: int
    layer_range: str
    version: str
    current_run_id: str
    next_step: int
    wall_clock: float
    precision: str
    device_name: str
    compute_capability: str
    device_total_memory_bytes: int
    device_free_memory_bytes: int
    memory_budget_bytes: int
    def __init__(self, stage_rank: _Optional[int] = ..., num_stages: _Optional[int] = ..., stage_name: _Optional[str] = ..., device: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., model_settings_json: _Optional[str] = ..., num_parameters: _Optional[int] = ..., layer_range: _Optional[str] = ..., version: _Optional[str] = ..., current_run_id: _Optional[str] = ..., next_step: _Optional[int] = ..., wall_clock: _Optional[float] = ..., precision: _Optional[str] = ..., device_name: _Optional[str] = ..., compute_capability: _Optional[str] = ..., device_total_memory_bytes: _Optional[int] = ..., device_free_memory_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("run_id", "train_settings_json", "next_stage_address", "prev_stage_address", "regret_address", "first_step", "reinitialize")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    NEXT_STAGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREV_STAGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGRET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    REINITIALIZE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    train_settings_json: str
    next_stage_address: str
    prev_stage_address: str
    regret_address: str
    first_step: int
    reinitialize: bool
    def __init__(self, run_id: _Optional[str] = ..., train_settings_json: _Optional[str] = ..., next_stage_address: _Optional[str] = ..., prev_stage_address: _Optional[str] = ..., regret_address: _Optional[str] = ..., first_step: _Optional[int] = ..., reinitialize: _Optional[bool] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("num_parameters", "precision", "precision_reason")
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    num_parameters: int
    precision: str
    precision_reason: str
    def __init__(self, num_parameters: _Optional[int] = ..., precision: _Optional[str] = ..., precision_reason: _Optional[str] = ...) -> None: ...

class MicroBatch(_message.Message):
    __slots__ = ("index", "inputs", "sample_ids")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., sample_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("envelope", "accumulation_round", "accumulation_steps", "schedule", "micro_batches", "loss_multiplier", "loss_scale", "deadline_seconds", "forward_only", "lookahead", "attempt")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATION_ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LOSS_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ONLY_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    envelope: _tensor_pb2.Envelope
    accumulation_round: int
    accumulation_steps: int
    schedule: str
    micro_batches: _containers.RepeatedCompositeFieldContainer[MicroBatch]
    loss_multiplier: float
    loss_scale: float
    deadline_seconds: float
    forward_only: bool
    lookahead: int
    attempt: int
    def __init__(self, envelope: _Optional[_Union[_tensor_pb2.Envelope, _Mapping]] = ..., accumulation_round: _Optional[int] = ..., accumulation_steps: _Optional[int] = ..., schedule: _Optional[str] = ..., micro_batches: _Optional[_Iterable[_Union[MicroBatch, _Mapping]]] = ..., loss_multiplier: _Optional[float] = ..., loss_scale: _Optional[float] = ..., deadline_seconds: _Optional[float] = ..., forward_only: _Optional[bool] = ..., lookahead: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class MicroBatchResult(_message.Message):
    __slots__ = ("index", "losses", "total_loss", "regret_mean", "regret_computations", "bentham_evaluations", "samples", "outputs", "regret_max")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    REGRET_MEAN_FIELD_NUMBER: _ClassVar[int]
    REGRET_COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    BENTHAM_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REGRET_MAX_FIELD_NUMBER: _ClassVar[int]
    index: int
    losses: _containers.ScalarMap[str, float]
    total_loss: float
    regret_mean: float
    regret_computations: int
    bentham_evaluations: int
    samples: int
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    regret_max: float
    def __init__(self, index: _Optional[int] = ..., losses: _Optional[_Mapping[str, float]] = ..., total_loss: _Optional[float] = ..., regret_mean: _Optional[float] = ..., regret_computations: _Optional[int] = ..., bentham_evaluations: _Optional[int] = ..., samples: _Optional[int] = ..., outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., regret_max: _Optional[float] = ...) -> None: ...

class StepTimings(_message.Message):
    __slots__ = ("forward_seconds", "backward_seconds", "wait_seconds", "serialize_seconds", "send_seconds", "bytes_sent", "bytes_received", "total_seconds", "regret_wait_seconds", "allreduce_seconds", "allreduce_bytes")
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERIALIZE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REGRET_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLREDUCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLREDUCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    forward_seconds: float
    backward_seconds: float
    wait_seconds: float
    serialize_seconds: float
    send_seconds: float
    bytes_sent: int
    bytes_received: int
    total_seconds: float
    regret_wait_seconds: float
    allreduce_seconds: float
    allreduce_bytes: int
    def __init__(self, forward_seconds: _Optional[float] = ..., backward_seconds: _Optional[float] = ..., wait_seconds: _Optional[float] = ..., serialize_seconds: _Optional[float] = ..., send_seconds: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., total_seconds: _Optional[float] = ..., regret_wait_seconds: _Optional[float] = ..., allreduce_seconds: _Optional[float] = ..., allreduce_bytes: _Optional[int] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("action", "micro_batch", "start", "end", "thread")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    THREAD_FIELD_NUMBER: _ClassVar[int]
    action: str
    micro_batch: int
    start: float
    end: float
    thread: str
    def __init__(self, action: _Optional[str] = ..., micro_batch: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., thread: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("envelope", "accumulation_round", "micro_batches", "timings", "grad_norm_sq", "found_inf", "has_grad_norm", "spans", "peak_memory_bytes", "started_unix")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATION_ROUND_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    FOUND_INF_FIELD_NUMBER: _ClassVar[int]
    HAS_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    envelope: _tensor_pb2.Envelope
    accumulation_round: int
    micro_batches: _containers.RepeatedCompositeFieldContainer[MicroBatchResult]
    timings: StepTimings
    grad_norm_sq: float
    found_inf: bool
    has_grad_norm: bool
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    peak_memory_bytes: int
    started_unix: float
    def __init__(self, envelope: _Optional[_Union[_tensor_pb2.Envelope, _Mapping]] = ..., accumulation_round: _Optional[int] = ..., micro_batches: _Optional[_Iterable[_Union[MicroBatchResult, _Mapping]]] = ..., timings: _Optional[_Union[StepTimings, _Mapping]] = ..., grad_norm_sq: _Optional[float] = ..., found_inf: _Optional[bool] = ..., has_grad_norm: _Optional[bool] = ..., spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., peak_memory_bytes: _Optional[int] = ..., started_unix: _Optional[float] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("envelope", "clip_coefficient", "learning_rate", "skip", "loss_scale")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    envelope: _tensor_pb2.Envelope
    clip_coefficient: float
    learning_rate: float
    skip: bool
    loss_scale: float
    def __init__(self, envelope: _Optional[_Union[_tensor_pb2.Envelope, _Mapping]] = ..., clip_coefficient: _Optional[float] = ..., learning_rate: _Optional[float] = ..., skip: _Optional[bool] = ..., loss_scale: _Optional[float] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("next_step", "seconds", "applied", "started_unix")
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    next_step: int
    seconds: float
    applied: bool
    started_unix: float
    def __init__(self, next_step: _Optional[int] = ..., seconds: _Optional[float] = ..., applied: _Optional[bool] = ..., started_unix: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("run_id", "step", "reason", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    reason: str
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorTransfer(_message.Message):
    __slots__ = ("envelope", "tensor", "sender")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    envelope: _tensor_pb2.Envelope
    tensor: _tensor_pb2.Tensor
    sender: str
    def __init__(self, envelope: _Optional[_Union[_tensor_pb2.Envelope, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sender: _Optional[str] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("duplicate", "stale")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    stale: bool
    def __init__(self, duplicate: _Optional[bool] = ..., stale: _Optional[bool] = ...) -> None: ...

class SaveStateRequest(_message.Message):
    __slots__ = ("run_id", "step", "directory")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    directory: str
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., directory: _Optional[str] = ...) -> None: ...

class SaveStateResponse(_message.Message):
    __slots__ = ("files", "bytes", "seconds", "sha256")
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    bytes: int
    seconds: float
    sha256: str
    def __init__(self, files: _Optional[_Iterable[str]] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., sha256: _Optional[str] = ...) -> None: ...

class LoadStateRequest(_message.Message):
    __slots__ = ("run_id", "directory", "step")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    directory: str
    step: int
    def __init__(self, run_id: _Optional[str] = ..., directory: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class LoadStateResponse(_message.Message):
    __slots__ = ("next_step",)
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    next_step: int
    def __init__(self, next_step: _Optional[int] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

from redheart.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("envelope", "bentham", "scenario_ids", "explain")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    BENTHAM_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    envelope: _tensor_pb2.Envelope
    bentham: _tensor_pb2.Tensor
    scenario_ids: _containers.RepeatedScalarFieldContainer[str]
    explain: bool
    def __init__(self, envelope: _Optional[_Union[_tensor_pb2.Envelope, _Mapping]] = ..., bentham: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scenario_ids: _Optional[_Iterable[str]] = ..., explain: _Optional[bool] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("scenario_id", "regret", "best_counterfactual", "best_counterfactual_name", "actual_utility", "counterfactual_utilities", "actual_perspective_utilities", "best_perspective_utilities")
    SCENARIO_ID_FIELD_NUMBER: _ClassVar[int]
    REGRET_FIELD_NUMBER: _ClassVar[int]
    BEST_COUNTERFACTUAL_FIELD_NUMBER: _ClassVar[int]
    BEST_COUNTERFACTUAL_NAME_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_UTILITY_FIELD_NUMBER: _ClassVar[int]
    COUNTERFACTUAL_UTILITIES_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_PERSPECTIVE_UTILITIES_FIELD_NUMBER: _ClassVar[int]
    BEST_PERSPECTIVE_UTILITIES_FIELD_NUMBER: _ClassVar[int]
    scenario_id: str
    regret: float
    best_counterfactual: int
    best_counterfactual_name: str
    actual_utility: float
    counterfactual_utilities: _containers.RepeatedScalarFieldContainer[float]
    actual_perspective_utilities: _containers.RepeatedScalarFieldContainer[float]
    best_perspective_utilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scenario_id: _Optional[str] = ..., regret: _Optional[float] = ..., best_counterfactual: _Optional[int] = ..., best_counterfactual_name: _Optional[str] = ..., actual_utility: _Optional[float] = ..., counterfactual_utilities: _Optional[_Iterable[float]] = ..., actual_perspective_utilities: _Optional[_Iterable[float]] = ..., best_perspective_utilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("regret", "best_counterfactual", "regret_computations", "bentham_evaluations", "explanations", "seconds")
    REGRET_FIELD_NUMBER: _ClassVar[int]
    BEST_COUNTERFACTUAL_FIELD_NUMBER: _ClassVar[int]
    REGRET_COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    BENTHAM_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    regret: _tensor_pb2.Tensor
    best_counterfactual: _tensor_pb2.Tensor
    regret_computations: int
    bentham_evaluations: int
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    seconds: float
    def __init__(self, regret: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., best_counterfactual: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., regret_computations: _Optional[int] = ..., bentham_evaluations: _Optional[int] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

from histohelper.v1 import slide_analysis_pb2 as _slide_analysis_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _slide_analysis_pb2.ModelRef
    def __init__(self, model: _Optional[_Union[_slide_analysis_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _slide_analysis_pb2.ModelRef
    def __init__(self, model: _Optional[_Union[_slide_analysis_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class SetDefaultModelRequest(_message.Message):
    __slots__ = ("model", "server_default")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVER_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    model: _slide_analysis_pb2.ModelRef
    server_default: bool
    def __init__(self, model: _Optional[_Union[_slide_analysis_pb2.ModelRef, _Mapping]] = ..., server_default: _Optional[bool] = ...) -> None: ...

class RescanRepositoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelAdminResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_slide_analysis_pb2.RepositoryModel]
    def __init__(self, models: _Optional[_Iterable[_Union[_slide_analysis_pb2.RepositoryModel, _Mapping]]] = ...) -> None: ...

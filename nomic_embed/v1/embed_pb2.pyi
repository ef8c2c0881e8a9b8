import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_SEARCH_DOCUMENT: _ClassVar[Task]
    TASK_SEARCH_QUERY: _ClassVar[Task]
    TASK_CLUSTERING: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_RAW: _ClassVar[Task]

class LongTextMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_TEXT_MODE_UNSPECIFIED: _ClassVar[LongTextMode]
    LONG_TEXT_MODE_TRUNCATE: _ClassVar[LongTextMode]
    LONG_TEXT_MODE_ERROR: _ClassVar[LongTextMode]
    LONG_TEXT_MODE_MEAN: _ClassVar[LongTextMode]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FLOAT32: _ClassVar[Encoding]
    ENCODING_FLOAT16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_UBINARY: _ClassVar[Encoding]
TASK_UNSPECIFIED: Task
TASK_SEARCH_DOCUMENT: Task
TASK_SEARCH_QUERY: Task
TASK_CLUSTERING: Task
TASK_CLASSIFICATION: Task
TASK_RAW: Task
LONG_TEXT_MODE_UNSPECIFIED: LongTextMode
LONG_TEXT_MODE_TRUNCATE: LongTextMode
LONG_TEXT_MODE_ERROR: LongTextMode
LONG_TEXT_MODE_MEAN: LongTextMode
ENCODING_UNSPECIFIED: Encoding
ENCODING_FLOAT32: Encoding
ENCODING_FLOAT16: Encoding
ENCODING_INT8: Encoding
ENCODING_UBINARY: Encoding

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "task", "dimensions", "long_text_mode", "max_tokens", "encoding")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    LONG_TEXT_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    dimensions: int
    long_text_mode: LongTextMode
    max_tokens: int
    encoding: Encoding
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ..., dimensions: _Optional[int] = ..., long_text_mode: _Optional[_Union[LongTextMode, str]] = ..., max_tokens: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "tokens", "truncated", "windows", "packed")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    tokens: int
    truncated: bool
    windows: int
    packed: bytes
    def __init__(self, values: _Optional[_Iterable[float]] = ..., tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., windows: _Optional[int] = ..., packed: _Optional[bytes] = ...) -> None: ...

class ResponseMetadata(_message.Message):
    __slots__ = ("model_id", "variant", "dimensions", "total_tokens", "queue_time", "inference_time", "total_time", "encoding", "weights_digest", "model_digest")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TIME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    variant: str
    dimensions: int
    total_tokens: int
    queue_time: _duration_pb2.Duration
    inference_time: _duration_pb2.Duration
    total_time: _duration_pb2.Duration
    encoding: Encoding
    weights_digest: str
    model_digest: str
    def __init__(self, model_id: _Optional[str] = ..., variant: _Optional[str] = ..., dimensions: _Optional[int] = ..., total_tokens: _Optional[int] = ..., queue_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., inference_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., weights_digest: _Optional[str] = ..., model_digest: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "metadata")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    metadata: ResponseMetadata
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class EmbedStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: EmbedRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[EmbedRequest, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "field", "retry_delay")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    RETRY_DELAY_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    retry_delay: _duration_pb2.Duration
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., retry_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: EmbedResponse
    error: StreamError
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[EmbedResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_texts_per_request", "max_input_tokens", "max_batch_tokens", "max_batch_rows", "max_text_chars", "max_request_tokens", "max_request_bytes", "max_queue_tokens")
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_texts_per_request: int
    max_input_tokens: int
    max_batch_tokens: int
    max_batch_rows: int
    max_text_chars: int
    max_request_tokens: int
    max_request_bytes: int
    max_queue_tokens: int
    def __init__(self, max_texts_per_request: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_queue_tokens: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "variant", "variant_reason", "device", "dimensions", "min_dimensions", "max_input_tokens", "weight_bytes", "limits", "task_prefixes", "pooling", "server_version", "revision", "trained_positions", "batch_dependence", "weights_digest", "model_digest")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TASK_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TRAINED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_DEPENDENCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    variant: str
    variant_reason: str
    device: str
    dimensions: int
    min_dimensions: int
    max_input_tokens: int
    weight_bytes: int
    limits: Limits
    task_prefixes: bool
    pooling: str
    server_version: str
    revision: str
    trained_positions: int
    batch_dependence: str
    weights_digest: str
    model_digest: str
    def __init__(self, model_id: _Optional[str] = ..., variant: _Optional[str] = ..., variant_reason: _Optional[str] = ..., device: _Optional[str] = ..., dimensions: _Optional[int] = ..., min_dimensions: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., task_prefixes: _Optional[bool] = ..., pooling: _Optional[str] = ..., server_version: _Optional[str] = ..., revision: _Optional[str] = ..., trained_positions: _Optional[int] = ..., batch_dependence: _Optional[str] = ..., weights_digest: _Optional[str] = ..., model_digest: _Optional[str] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("texts", "task")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ...) -> None: ...

class TokenizedText(_message.Message):
    __slots__ = ("token_count", "ids")
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    token_count: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_count: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedCompositeFieldContainer[TokenizedText]
    def __init__(self, texts: _Optional[_Iterable[_Union[TokenizedText, _Mapping]]] = ...) -> None: ...

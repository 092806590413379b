from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeypointFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEYPOINT_FORMAT_UNSPECIFIED: _ClassVar[KeypointFormat]
    KEYPOINT_FORMAT_COCO_17: _ClassVar[KeypointFormat]
    KEYPOINT_FORMAT_BLAZEPOSE_33: _ClassVar[KeypointFormat]
    KEYPOINT_FORMAT_OPENPOSE_BODY_25: _ClassVar[KeypointFormat]
    KEYPOINT_FORMAT_OPENPOSE_COCO_18: _ClassVar[KeypointFormat]
KEYPOINT_FORMAT_UNSPECIFIED: KeypointFormat
KEYPOINT_FORMAT_COCO_17: KeypointFormat
KEYPOINT_FORMAT_BLAZEPOSE_33: KeypointFormat
KEYPOINT_FORMAT_OPENPOSE_BODY_25: KeypointFormat
KEYPOINT_FORMAT_OPENPOSE_COCO_18: KeypointFormat

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("pixels", "height", "width", "channels")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    height: int
    width: int
    channels: int
    def __init__(self, pixels: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Keypoint(_message.Message):
    __slots__ = ("x", "y", "score")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    score: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("keypoints", "box", "score", "track_id")
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    box: Box
    score: float
    track_id: int
    def __init__(self, keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., track_id: _Optional[int] = ...) -> None: ...

class RefinePoseRequest(_message.Message):
    __slots__ = ("image", "format", "persons")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    image: Image
    format: KeypointFormat
    persons: _containers.RepeatedCompositeFieldContainer[Person]
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., format: _Optional[_Union[KeypointFormat, str]] = ..., persons: _Optional[_Iterable[_Union[Person, _Mapping]]] = ...) -> None: ...

class RefinedKeypoint(_message.Message):
    __slots__ = ("x", "y", "confidence", "refined", "kept_input")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    REFINED_FIELD_NUMBER: _ClassVar[int]
    KEPT_INPUT_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    confidence: float
    refined: bool
    kept_input: bool
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., confidence: _Optional[float] = ..., refined: _Optional[bool] = ..., kept_input: _Optional[bool] = ...) -> None: ...

class RefinedPerson(_message.Message):
    __slots__ = ("keypoints", "box", "score", "track_id")
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    keypoints: _containers.RepeatedCompositeFieldContainer[RefinedKeypoint]
    box: Box
    score: float
    track_id: int
    def __init__(self, keypoints: _Optional[_Iterable[_Union[RefinedKeypoint, _Mapping]]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., track_id: _Optional[int] = ...) -> None: ...

class RefinePoseResponse(_message.Message):
    __slots__ = ("persons",)
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    persons: _containers.RepeatedCompositeFieldContainer[RefinedPerson]
    def __init__(self, persons: _Optional[_Iterable[_Union[RefinedPerson, _Mapping]]] = ...) -> None: ...

class OneEuroFilter(_message.Message):
    __slots__ = ("min_cutoff_hz", "beta", "d_cutoff_hz")
    MIN_CUTOFF_HZ_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    D_CUTOFF_HZ_FIELD_NUMBER: _ClassVar[int]
    min_cutoff_hz: float
    beta: float
    d_cutoff_hz: float
    def __init__(self, min_cutoff_hz: _Optional[float] = ..., beta: _Optional[float] = ..., d_cutoff_hz: _Optional[float] = ...) -> None: ...

class StreamOptions(_message.Message):
    __slots__ = ("follow_tracks", "smoothing", "frame_rate_hz", "temporal")
    FOLLOW_TRACKS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    FRAME_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_FIELD_NUMBER: _ClassVar[int]
    follow_tracks: bool
    smoothing: OneEuroFilter
    frame_rate_hz: float
    temporal: TemporalOptions
    def __init__(self, follow_tracks: _Optional[bool] = ..., smoothing: _Optional[_Union[OneEuroFilter, _Mapping]] = ..., frame_rate_hz: _Optional[float] = ..., temporal: _Optional[_Union[TemporalOptions, _Mapping]] = ...) -> None: ...

class TemporalOptions(_message.Message):
    __slots__ = ("smoother", "max_gap")
    SMOOTHER_FIELD_NUMBER: _ClassVar[int]
    MAX_GAP_FIELD_NUMBER: _ClassVar[int]
    smoother: str
    max_gap: int
    def __init__(self, smoother: _Optional[str] = ..., max_gap: _Optional[int] = ...) -> None: ...

class RefinePoseStreamRequest(_message.Message):
    __slots__ = ("options", "frame", "timestamp_us")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    options: StreamOptions
    frame: RefinePoseRequest
    timestamp_us: int
    def __init__(self, options: _Optional[_Union[StreamOptions, _Mapping]] = ..., frame: _Optional[_Union[RefinePoseRequest, _Mapping]] = ..., timestamp_us: _Optional[int] = ...) -> None: ...

class RefinePoseStreamResponse(_message.Message):
    __slots__ = ("frame_index", "result")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    result: RefinePoseResponse
    def __init__(self, frame_index: _Optional[int] = ..., result: _Optional[_Union[RefinePoseResponse, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_persons_per_image", "max_image_side", "max_image_pixels", "max_message_bytes", "max_batch_size", "max_queue_delay_ms", "max_queue_size")
    MAX_PERSONS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_persons_per_image: int
    max_image_side: int
    max_image_pixels: int
    max_message_bytes: int
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    def __init__(self, max_persons_per_image: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ...) -> None: ...

class FormatInfo(_message.Message):
    __slots__ = ("format", "keypoint_names")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    KEYPOINT_NAMES_FIELD_NUMBER: _ClassVar[int]
    format: KeypointFormat
    keypoint_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, format: _Optional[_Union[KeypointFormat, str]] = ..., keypoint_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("keypoint_format", "input_height", "input_width", "model_variant", "model_version", "server_version", "limits", "formats", "flip_test", "index_loaded", "index_size", "backend")
    KEYPOINT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VARIANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    FLIP_TEST_FIELD_NUMBER: _ClassVar[int]
    INDEX_LOADED_FIELD_NUMBER: _ClassVar[int]
    INDEX_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    keypoint_format: KeypointFormat
    input_height: int
    input_width: int
    model_variant: str
    model_version: str
    server_version: str
    limits: Limits
    formats: _containers.RepeatedCompositeFieldContainer[FormatInfo]
    flip_test: bool
    index_loaded: bool
    index_size: int
    backend: str
    def __init__(self, keypoint_format: _Optional[_Union[KeypointFormat, str]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., model_variant: _Optional[str] = ..., model_version: _Optional[str] = ..., server_version: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., formats: _Optional[_Iterable[_Union[FormatInfo, _Mapping]]] = ..., flip_test: _Optional[bool] = ..., index_loaded: _Optional[bool] = ..., index_size: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class SearchPosesRequest(_message.Message):
    __slots__ = ("format", "query", "image", "k", "mirror")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    format: KeypointFormat
    query: Person
    image: Image
    k: int
    mirror: bool
    def __init__(self, format: _Optional[_Union[KeypointFormat, str]] = ..., query: _Optional[_Union[Person, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., k: _Optional[int] = ..., mirror: _Optional[bool] = ...) -> None: ...

class PoseMatch(_message.Message):
    __slots__ = ("pose_id", "image_id", "box", "distance", "mirrored", "keypoints")
    POSE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    pose_id: int
    image_id: int
    box: Box
    distance: float
    mirrored: bool
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    def __init__(self, pose_id: _Optional[int] = ..., image_id: _Optional[int] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., distance: _Optional[float] = ..., mirrored: _Optional[bool] = ..., keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ...) -> None: ...

class SearchPosesResponse(_message.Message):
    __slots__ = ("matches", "query")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[PoseMatch]
    query: _containers.RepeatedCompositeFieldContainer[Keypoint]
    def __init__(self, matches: _Optional[_Iterable[_Union[PoseMatch, _Mapping]]] = ..., query: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ...) -> None: ...

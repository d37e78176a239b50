from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EdgeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDGE_MODE_UNSPECIFIED: _ClassVar[EdgeMode]
    EDGE_MODE_PAD: _ClassVar[EdgeMode]
    EDGE_MODE_DROP: _ClassVar[EdgeMode]

class StainMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAIN_METHOD_UNSPECIFIED: _ClassVar[StainMethod]
    STAIN_METHOD_NONE: _ClassVar[StainMethod]
    STAIN_METHOD_MACENKO: _ClassVar[StainMethod]
    STAIN_METHOD_REINHARD: _ClassVar[StainMethod]
    STAIN_METHOD_VAHADANE: _ClassVar[StainMethod]

class StainReference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAIN_REFERENCE_UNSPECIFIED: _ClassVar[StainReference]
    STAIN_REFERENCE_PUBLISHED: _ClassVar[StainReference]
    STAIN_REFERENCE_MODEL: _ClassVar[StainReference]
    STAIN_REFERENCE_SERVER: _ClassVar[StainReference]

class AnalysisOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANALYSIS_OUTCOME_UNSPECIFIED: _ClassVar[AnalysisOutcome]
    ANALYSIS_OUTCOME_COMPLETED: _ClassVar[AnalysisOutcome]
    ANALYSIS_OUTCOME_NO_TISSUE: _ClassVar[AnalysisOutcome]

class RankBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_BY_UNSPECIFIED: _ClassVar[RankBy]
    RANK_BY_PROBABILITY: _ClassVar[RankBy]
    RANK_BY_ATTENTION: _ClassVar[RankBy]
EDGE_MODE_UNSPECIFIED: EdgeMode
EDGE_MODE_PAD: EdgeMode
EDGE_MODE_DROP: EdgeMode
STAIN_METHOD_UNSPECIFIED: StainMethod
STAIN_METHOD_NONE: StainMethod
STAIN_METHOD_MACENKO: StainMethod
STAIN_METHOD_REINHARD: StainMethod
STAIN_METHOD_VAHADANE: StainMethod
STAIN_REFERENCE_UNSPECIFIED: StainReference
STAIN_REFERENCE_PUBLISHED: StainReference
STAIN_REFERENCE_MODEL: StainReference
STAIN_REFERENCE_SERVER: StainReference
ANALYSIS_OUTCOME_UNSPECIFIED: AnalysisOutcome
ANALYSIS_OUTCOME_COMPLETED: AnalysisOutcome
ANALYSIS_OUTCOME_NO_TISSUE: AnalysisOutcome
RANK_BY_UNSPECIFIED: RankBy
RANK_BY_PROBABILITY: RankBy
RANK_BY_ATTENTION: RankBy

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class DicomWebSeries(_message.Message):
    __slots__ = ("server", "study_instance_uid", "series_instance_uid")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    server: str
    study_instance_uid: str
    series_instance_uid: str
    def __init__(self, server: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ...) -> None: ...

class Resolution(_message.Message):
    __slots__ = ("mpp", "magnification", "level")
    MPP_FIELD_NUMBER: _ClassVar[int]
    MAGNIFICATION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    mpp: float
    magnification: float
    level: int
    def __init__(self, mpp: _Optional[float] = ..., magnification: _Optional[float] = ..., level: _Optional[int] = ...) -> None: ...

class AnalysisOptions(_message.Message):
    __slots__ = ("target_resolution", "patch_size_px", "stride_px", "min_tissue_fraction", "edge_mode", "batch_size", "return_embeddings", "return_attention", "mpp_override", "return_cams", "mc_dropout_passes", "stain_normalization", "roi")
    TARGET_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    STRIDE_PX_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EDGE_MODE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    MPP_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    RETURN_CAMS_FIELD_NUMBER: _ClassVar[int]
    MC_DROPOUT_PASSES_FIELD_NUMBER: _ClassVar[int]
    STAIN_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    ROI_FIELD_NUMBER: _ClassVar[int]
    target_resolution: Resolution
    patch_size_px: int
    stride_px: int
    min_tissue_fraction: float
    edge_mode: EdgeMode
    batch_size: int
    return_embeddings: bool
    return_attention: bool
    mpp_override: float
    return_cams: bool
    mc_dropout_passes: int
    stain_normalization: StainNormalization
    roi: RegionOfInterest
    def __init__(self, target_resolution: _Optional[_Union[Resolution, _Mapping]] = ..., patch_size_px: _Optional[int] = ..., stride_px: _Optional[int] = ..., min_tissue_fraction: _Optional[float] = ..., edge_mode: _Optional[_Union[EdgeMode, str]] = ..., batch_size: _Optional[int] = ..., return_embeddings: _Optional[bool] = ..., return_attention: _Optional[bool] = ..., mpp_override: _Optional[float] = ..., return_cams: _Optional[bool] = ..., mc_dropout_passes: _Optional[int] = ..., stain_normalization: _Optional[_Union[StainNormalization, _Mapping]] = ..., roi: _Optional[_Union[RegionOfInterest, _Mapping]] = ...) -> None: ...

class StainNormalization(_message.Message):
    __slots__ = ("method", "reference")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    method: StainMethod
    reference: StainReference
    def __init__(self, method: _Optional[_Union[StainMethod, str]] = ..., reference: _Optional[_Union[StainReference, str]] = ...) -> None: ...

class AppliedStainNormalization(_message.Message):
    __slots__ = ("method", "reference", "source", "fitted_stain_matrix", "fitted_max_concentrations", "fitted_means", "fitted_stds", "warning")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FITTED_STAIN_MATRIX_FIELD_NUMBER: _ClassVar[int]
    FITTED_MAX_CONCENTRATIONS_FIELD_NUMBER: _ClassVar[int]
    FITTED_MEANS_FIELD_NUMBER: _ClassVar[int]
    FITTED_STDS_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    method: StainMethod
    reference: StainReference
    source: str
    fitted_stain_matrix: _containers.RepeatedScalarFieldContainer[float]
    fitted_max_concentrations: _containers.RepeatedScalarFieldContainer[float]
    fitted_means: _containers.RepeatedScalarFieldContainer[float]
    fitted_stds: _containers.RepeatedScalarFieldContainer[float]
    warning: str
    def __init__(self, method: _Optional[_Union[StainMethod, str]] = ..., reference: _Optional[_Union[StainReference, str]] = ..., source: _Optional[str] = ..., fitted_stain_matrix: _Optional[_Iterable[float]] = ..., fitted_max_concentrations: _Optional[_Iterable[float]] = ..., fitted_means: _Optional[_Iterable[float]] = ..., fitted_stds: _Optional[_Iterable[float]] = ..., warning: _Optional[str] = ...) -> None: ...

class RegionOfInterest(_message.Message):
    __slots__ = ("include_geojson", "exclude_geojson", "mask_png", "mask_downsample")
    INCLUDE_GEOJSON_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_GEOJSON_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    MASK_DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    include_geojson: str
    exclude_geojson: str
    mask_png: bytes
    mask_downsample: float
    def __init__(self, include_geojson: _Optional[str] = ..., exclude_geojson: _Optional[str] = ..., mask_png: _Optional[bytes] = ..., mask_downsample: _Optional[float] = ...) -> None: ...

class AnalyzeSlideRequest(_message.Message):
    __slots__ = ("slide_path", "upload_id", "dicomweb", "options", "request_id", "model")
    SLIDE_PATH_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DICOMWEB_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    slide_path: str
    upload_id: str
    dicomweb: DicomWebSeries
    options: AnalysisOptions
    request_id: str
    model: ModelRef
    def __init__(self, slide_path: _Optional[str] = ..., upload_id: _Optional[str] = ..., dicomweb: _Optional[_Union[DicomWebSeries, _Mapping]] = ..., options: _Optional[_Union[AnalysisOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class AnalyzeSlideResponse(_message.Message):
    __slots__ = ("started", "progress", "patches", "attention", "completed")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    started: AnalysisStarted
    progress: AnalysisProgress
    patches: PatchResults
    attention: AttentionChunk
    completed: AnalysisCompleted
    def __init__(self, started: _Optional[_Union[AnalysisStarted, _Mapping]] = ..., progress: _Optional[_Union[AnalysisProgress, _Mapping]] = ..., patches: _Optional[_Union[PatchResults, _Mapping]] = ..., attention: _Optional[_Union[AttentionChunk, _Mapping]] = ..., completed: _Optional[_Union[AnalysisCompleted, _Mapping]] = ...) -> None: ...

class PyramidLevel(_message.Message):
    __slots__ = ("width_px", "height_px", "downsample_x", "downsample_y")
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_X_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_Y_FIELD_NUMBER: _ClassVar[int]
    width_px: int
    height_px: int
    downsample_x: float
    downsample_y: float
    def __init__(self, width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., downsample_x: _Optional[float] = ..., downsample_y: _Optional[float] = ...) -> None: ...

class SlideInfo(_message.Message):
    __slots__ = ("vendor", "width_l0", "height_l0", "levels", "mpp_x", "mpp_y", "objective_power")
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    WIDTH_L0_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_L0_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MPP_X_FIELD_NUMBER: _ClassVar[int]
    MPP_Y_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_POWER_FIELD_NUMBER: _ClassVar[int]
    vendor: str
    width_l0: int
    height_l0: int
    levels: _containers.RepeatedCompositeFieldContainer[PyramidLevel]
    mpp_x: float
    mpp_y: float
    objective_power: float
    def __init__(self, vendor: _Optional[str] = ..., width_l0: _Optional[int] = ..., height_l0: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[PyramidLevel, _Mapping]]] = ..., mpp_x: _Optional[float] = ..., mpp_y: _Optional[float] = ..., objective_power: _Optional[float] = ...) -> None: ...

class GridGeometry(_message.Message):
    __slots__ = ("n_rows", "n_cols", "origin_x_l0", "origin_y_l0", "stride_x_l0", "stride_y_l0", "patch_width_l0", "patch_height_l0", "level", "level_downsample_x", "level_downsample_y", "read_width_px", "read_height_px", "patch_size_px", "stride_px", "effective_mpp", "mpp_source", "edge_mode", "min_tissue_fraction", "patch_count")
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    N_COLS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_X_L0_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_Y_L0_FIELD_NUMBER: _ClassVar[int]
    STRIDE_X_L0_FIELD_NUMBER: _ClassVar[int]
    STRIDE_Y_L0_FIELD_NUMBER: _ClassVar[int]
    PATCH_WIDTH_L0_FIELD_NUMBER: _ClassVar[int]
    PATCH_HEIGHT_L0_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_DOWNSAMPLE_X_FIELD_NUMBER: _ClassVar[int]
    LEVEL_DOWNSAMPLE_Y_FIELD_NUMBER: _ClassVar[int]
    READ_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    READ_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    STRIDE_PX_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_MPP_FIELD_NUMBER: _ClassVar[int]
    MPP_SOURCE_FIELD_NUMBER: _ClassVar[int]
    EDGE_MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    n_rows: int
    n_cols: int
    origin_x_l0: float
    origin_y_l0: float
    stride_x_l0: float
    stride_y_l0: float
    patch_width_l0: float
    patch_height_l0: float
    level: int
    level_downsample_x: float
    level_downsample_y: float
    read_width_px: int
    read_height_px: int
    patch_size_px: int
    stride_px: int
    effective_mpp: float
    mpp_source: str
    edge_mode: EdgeMode
    min_tissue_fraction: float
    patch_count: int
    def __init__(self, n_rows: _Optional[int] = ..., n_cols: _Optional[int] = ..., origin_x_l0: _Optional[float] = ..., origin_y_l0: _Optional[float] = ..., stride_x_l0: _Optional[float] = ..., stride_y_l0: _Optional[float] = ..., patch_width_l0: _Optional[float] = ..., patch_height_l0: _Optional[float] = ..., level: _Optional[int] = ..., level_downsample_x: _Optional[float] = ..., level_downsample_y: _Optional[float] = ..., read_width_px: _Optional[int] = ..., read_height_px: _Optional[int] = ..., patch_size_px: _Optional[int] = ..., stride_px: _Optional[int] = ..., effective_mpp: _Optional[float] = ..., mpp_source: _Optional[str] = ..., edge_mode: _Optional[_Union[EdgeMode, str]] = ..., min_tissue_fraction: _Optional[float] = ..., patch_count: _Optional[int] = ...) -> None: ...

class Thumbnail(_message.Message):
    __slots__ = ("png", "width_px", "height_px", "scale_x", "scale_y")
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    SCALE_X_FIELD_NUMBER: _ClassVar[int]
    SCALE_Y_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    width_px: int
    height_px: int
    scale_x: float
    scale_y: float
    def __init__(self, png: _Optional[bytes] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., scale_x: _Optional[float] = ..., scale_y: _Optional[float] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "patch_classes", "slide_classes", "untrained", "precision", "device", "patch_size_px", "target_mpp", "embedding_dim", "engine", "untrained_parts", "artifact_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATCH_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SLIDE_CLASSES_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    TARGET_MPP_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_PARTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    patch_classes: _containers.RepeatedScalarFieldContainer[str]
    slide_classes: _containers.RepeatedScalarFieldContainer[str]
    untrained: bool
    precision: str
    device: str
    patch_size_px: int
    target_mpp: float
    embedding_dim: int
    engine: str
    untrained_parts: _containers.RepeatedScalarFieldContainer[str]
    artifact_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., patch_classes: _Optional[_Iterable[str]] = ..., slide_classes: _Optional[_Iterable[str]] = ..., untrained: _Optional[bool] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., patch_size_px: _Optional[int] = ..., target_mpp: _Optional[float] = ..., embedding_dim: _Optional[int] = ..., engine: _Optional[str] = ..., untrained_parts: _Optional[_Iterable[str]] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class QualityControl(_message.Message):
    __slots__ = ("tissue_fraction", "patch_count", "failed_patch_count", "warnings", "roi_excluded_patch_count", "ink", "faint_tissue")
    TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_PATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ROI_EXCLUDED_PATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    INK_FIELD_NUMBER: _ClassVar[int]
    FAINT_TISSUE_FIELD_NUMBER: _ClassVar[int]
    tissue_fraction: float
    patch_count: int
    failed_patch_count: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    roi_excluded_patch_count: int
    ink: _containers.RepeatedCompositeFieldContainer[InkFigure]
    faint_tissue: bool
    def __init__(self, tissue_fraction: _Optional[float] = ..., patch_count: _Optional[int] = ..., failed_patch_count: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., roi_excluded_patch_count: _Optional[int] = ..., ink: _Optional[_Iterable[_Union[InkFigure, _Mapping]]] = ..., faint_tissue: _Optional[bool] = ...) -> None: ...

class InkFigure(_message.Message):
    __slots__ = ("color", "slide_fraction", "inked_patch_count")
    COLOR_FIELD_NUMBER: _ClassVar[int]
    SLIDE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    INKED_PATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    color: str
    slide_fraction: float
    inked_patch_count: int
    def __init__(self, color: _Optional[str] = ..., slide_fraction: _Optional[float] = ..., inked_patch_count: _Optional[int] = ...) -> None: ...

class AnalysisStarted(_message.Message):
    __slots__ = ("request_id", "slide", "grid", "model", "qc", "thumbnail", "tissue_mask_png", "tiling_s", "stain", "dicom")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QC_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    TISSUE_MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    TILING_S_FIELD_NUMBER: _ClassVar[int]
    STAIN_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slide: SlideInfo
    grid: GridGeometry
    model: ModelSummary
    qc: QualityControl
    thumbnail: Thumbnail
    tissue_mask_png: bytes
    tiling_s: float
    stain: AppliedStainNormalization
    dicom: DicomSource
    def __init__(self, request_id: _Optional[str] = ..., slide: _Optional[_Union[SlideInfo, _Mapping]] = ..., grid: _Optional[_Union[GridGeometry, _Mapping]] = ..., model: _Optional[_Union[ModelSummary, _Mapping]] = ..., qc: _Optional[_Union[QualityControl, _Mapping]] = ..., thumbnail: _Optional[_Union[Thumbnail, _Mapping]] = ..., tissue_mask_png: _Optional[bytes] = ..., tiling_s: _Optional[float] = ..., stain: _Optional[_Union[AppliedStainNormalization, _Mapping]] = ..., dicom: _Optional[_Union[DicomSource, _Mapping]] = ...) -> None: ...

class DicomSource(_message.Message):
    __slots__ = ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "source_image_json", "dicomweb_server")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    FRAME_OF_REFERENCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IMAGE_JSON_FIELD_NUMBER: _ClassVar[int]
    DICOMWEB_SERVER_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    source_image_json: str
    dicomweb_server: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., frame_of_reference_uid: _Optional[str] = ..., source_image_json: _Optional[str] = ..., dicomweb_server: _Optional[str] = ...) -> None: ...

class AnalysisProgress(_message.Message):
    __slots__ = ("patches_done", "patches_total", "elapsed_s")
    PATCHES_DONE_FIELD_NUMBER: _ClassVar[int]
    PATCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    patches_done: int
    patches_total: int
    elapsed_s: float
    def __init__(self, patches_done: _Optional[int] = ..., patches_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class PatchResults(_message.Message):
    __slots__ = ("patch_index", "row", "col", "x_l0", "y_l0", "width_l0", "height_l0", "tissue_fraction", "is_edge", "num_classes", "probabilities", "embedding_dim", "embeddings", "failed_patch_index", "cam_size", "cams", "logits")
    PATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    X_L0_FIELD_NUMBER: _ClassVar[int]
    Y_L0_FIELD_NUMBER: _ClassVar[int]
    WIDTH_L0_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_L0_FIELD_NUMBER: _ClassVar[int]
    TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    IS_EDGE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FAILED_PATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    CAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    CAMS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    patch_index: _containers.RepeatedScalarFieldContainer[int]
    row: _containers.RepeatedScalarFieldContainer[int]
    col: _containers.RepeatedScalarFieldContainer[int]
    x_l0: _containers.RepeatedScalarFieldContainer[float]
    y_l0: _containers.RepeatedScalarFieldContainer[float]
    width_l0: _containers.RepeatedScalarFieldContainer[float]
    height_l0: _containers.RepeatedScalarFieldContainer[float]
    tissue_fraction: _containers.RepeatedScalarFieldContainer[float]
    is_edge: _containers.RepeatedScalarFieldContainer[bool]
    num_classes: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    embedding_dim: int
    embeddings: _containers.RepeatedScalarFieldContainer[float]
    failed_patch_index: _containers.RepeatedScalarFieldContainer[int]
    cam_size: int
    cams: _containers.RepeatedScalarFieldContainer[float]
    logits: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, patch_index: _Optional[_Iterable[int]] = ..., row: _Optional[_Iterable[int]] = ..., col: _Optional[_Iterable[int]] = ..., x_l0: _Optional[_Iterable[float]] = ..., y_l0: _Optional[_Iterable[float]] = ..., width_l0: _Optional[_Iterable[float]] = ..., height_l0: _Optional[_Iterable[float]] = ..., tissue_fraction: _Optional[_Iterable[float]] = ..., is_edge: _Optional[_Iterable[bool]] = ..., num_classes: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., embedding_dim: _Optional[int] = ..., embeddings: _Optional[_Iterable[float]] = ..., failed_patch_index: _Optional[_Iterable[int]] = ..., cam_size: _Optional[int] = ..., cams: _Optional[_Iterable[float]] = ..., logits: _Optional[_Iterable[float]] = ...) -> None: ...

class AttentionChunk(_message.Message):
    __slots__ = ("patch_index", "attention")
    PATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    patch_index: _containers.RepeatedScalarFieldContainer[int]
    attention: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, patch_index: _Optional[_Iterable[int]] = ..., attention: _Optional[_Iterable[float]] = ...) -> None: ...

class SlidePrediction(_message.Message):
    __slots__ = ("class_names", "logits", "probabilities", "predicted_class", "mc_dropout_passes", "mc_mean_probabilities", "mc_std_probabilities", "predictive_entropy_nats")
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    MC_DROPOUT_PASSES_FIELD_NUMBER: _ClassVar[int]
    MC_MEAN_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    MC_STD_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTIVE_ENTROPY_NATS_FIELD_NUMBER: _ClassVar[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    logits: _containers.RepeatedScalarFieldContainer[float]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    predicted_class: str
    mc_dropout_passes: int
    mc_mean_probabilities: _containers.RepeatedScalarFieldContainer[float]
    mc_std_probabilities: _containers.RepeatedScalarFieldContainer[float]
    predictive_entropy_nats: float
    def __init__(self, class_names: _Optional[_Iterable[str]] = ..., logits: _Optional[_Iterable[float]] = ..., probabilities: _Optional[_Iterable[float]] = ..., predicted_class: _Optional[str] = ..., mc_dropout_passes: _Optional[int] = ..., mc_mean_probabilities: _Optional[_Iterable[float]] = ..., mc_std_probabilities: _Optional[_Iterable[float]] = ..., predictive_entropy_nats: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("tiling_s", "first_result_s", "inference_s", "aggregate_s", "total_s", "patches_per_s")
    TILING_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_RESULT_S_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_S_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    PATCHES_PER_S_FIELD_NUMBER: _ClassVar[int]
    tiling_s: float
    first_result_s: float
    inference_s: float
    aggregate_s: float
    total_s: float
    patches_per_s: float
    def __init__(self, tiling_s: _Optional[float] = ..., first_result_s: _Optional[float] = ..., inference_s: _Optional[float] = ..., aggregate_s: _Optional[float] = ..., total_s: _Optional[float] = ..., patches_per_s: _Optional[float] = ...) -> None: ...

class AnalysisCompleted(_message.Message):
    __slots__ = ("request_id", "outcome", "prediction", "qc", "timings", "cached", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    QC_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outcome: AnalysisOutcome
    prediction: SlidePrediction
    qc: QualityControl
    timings: Timings
    cached: bool
    model: ModelRef
    def __init__(self, request_id: _Optional[str] = ..., outcome: _Optional[_Union[AnalysisOutcome, str]] = ..., prediction: _Optional[_Union[SlidePrediction, _Mapping]] = ..., qc: _Optional[_Union[QualityControl, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., cached: _Optional[bool] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "manifest_json", "default_batch_size", "max_concurrent_analyses", "models")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_ANALYSES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    manifest_json: str
    default_batch_size: int
    max_concurrent_analyses: int
    models: _containers.RepeatedCompositeFieldContainer[RepositoryModel]
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ..., manifest_json: _Optional[str] = ..., default_batch_size: _Optional[int] = ..., max_concurrent_analyses: _Optional[int] = ..., models: _Optional[_Iterable[_Union[RepositoryModel, _Mapping]]] = ...) -> None: ...

class RepositoryModel(_message.Message):
    __slots__ = ("model", "manifest_json", "default_version", "default_model", "state", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    manifest_json: str
    default_version: bool
    default_model: bool
    state: str
    error: str
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ..., manifest_json: _Optional[str] = ..., default_version: _Optional[bool] = ..., default_model: _Optional[bool] = ..., state: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class PatchImage(_message.Message):
    __slots__ = ("id", "encoded", "raw")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    id: str
    encoded: bytes
    raw: RawImage
    def __init__(self, id: _Optional[str] = ..., encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("width_px", "height_px", "rgb")
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    width_px: int
    height_px: int
    rgb: bytes
    def __init__(self, width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class ClassifyPatchesRequest(_message.Message):
    __slots__ = ("images", "return_embeddings", "model", "stain_normalization")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAIN_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[PatchImage]
    return_embeddings: bool
    model: ModelRef
    stain_normalization: StainNormalization
    def __init__(self, images: _Optional[_Iterable[_Union[PatchImage, _Mapping]]] = ..., return_embeddings: _Optional[bool] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., stain_normalization: _Optional[_Union[StainNormalization, _Mapping]] = ...) -> None: ...

class PatchPrediction(_message.Message):
    __slots__ = ("id", "logits", "probabilities", "embedding", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    logits: _containers.RepeatedScalarFieldContainer[float]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    error: str
    def __init__(self, id: _Optional[str] = ..., logits: _Optional[_Iterable[float]] = ..., probabilities: _Optional[_Iterable[float]] = ..., embedding: _Optional[_Iterable[float]] = ..., error: _Optional[str] = ...) -> None: ...

class ClassifyPatchesResponse(_message.Message):
    __slots__ = ("predictions", "model", "stain")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAIN_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[PatchPrediction]
    model: ModelRef
    stain: AppliedStainNormalization
    def __init__(self, predictions: _Optional[_Iterable[_Union[PatchPrediction, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., stain: _Optional[_Union[AppliedStainNormalization, _Mapping]] = ...) -> None: ...

class TopKSelection(_message.Message):
    __slots__ = ("k", "rank_by")
    K_FIELD_NUMBER: _ClassVar[int]
    RANK_BY_FIELD_NUMBER: _ClassVar[int]
    k: int
    rank_by: RankBy
    def __init__(self, k: _Optional[int] = ..., rank_by: _Optional[_Union[RankBy, str]] = ...) -> None: ...

class PatchIndexSelection(_message.Message):
    __slots__ = ("patch_index",)
    PATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    patch_index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, patch_index: _Optional[_Iterable[int]] = ...) -> None: ...

class ExplainPatchesRequest(_message.Message):
    __slots__ = ("slide_path", "upload_id", "dicomweb", "options", "top_k", "patches", "class_name", "jpeg_quality", "request_id", "model")
    SLIDE_PATH_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DICOMWEB_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    slide_path: str
    upload_id: str
    dicomweb: DicomWebSeries
    options: AnalysisOptions
    top_k: TopKSelection
    patches: PatchIndexSelection
    class_name: str
    jpeg_quality: int
    request_id: str
    model: ModelRef
    def __init__(self, slide_path: _Optional[str] = ..., upload_id: _Optional[str] = ..., dicomweb: _Optional[_Union[DicomWebSeries, _Mapping]] = ..., options: _Optional[_Union[AnalysisOptions, _Mapping]] = ..., top_k: _Optional[_Union[TopKSelection, _Mapping]] = ..., patches: _Optional[_Union[PatchIndexSelection, _Mapping]] = ..., class_name: _Optional[str] = ..., jpeg_quality: _Optional[int] = ..., request_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class PatchExplanation(_message.Message):
    __slots__ = ("patch_index", "row", "col", "x_l0", "y_l0", "width_l0", "height_l0", "image_jpeg", "class_name", "probabilities", "attention", "cam_size", "grad_cam", "rank", "score", "class_probability")
    PATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    X_L0_FIELD_NUMBER: _ClassVar[int]
    Y_L0_FIELD_NUMBER: _ClassVar[int]
    WIDTH_L0_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_L0_FIELD_NUMBER: _ClassVar[int]
    IMAGE_JPEG_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    CAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    patch_index: int
    row: int
    col: int
    x_l0: float
    y_l0: float
    width_l0: float
    height_l0: float
    image_jpeg: bytes
    class_name: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    attention: float
    cam_size: int
    grad_cam: _containers.RepeatedScalarFieldContainer[float]
    rank: int
    score: float
    class_probability: float
    def __init__(self, patch_index: _Optional[int] = ..., row: _Optional[int] = ..., col: _Optional[int] = ..., x_l0: _Optional[float] = ..., y_l0: _Optional[float] = ..., width_l0: _Optional[float] = ..., height_l0: _Optional[float] = ..., image_jpeg: _Optional[bytes] = ..., class_name: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., attention: _Optional[float] = ..., cam_size: _Optional[int] = ..., grad_cam: _Optional[_Iterable[float]] = ..., rank: _Optional[int] = ..., score: _Optional[float] = ..., class_probability: _Optional[float] = ...) -> None: ...

class ExplainPatchesResponse(_message.Message):
    __slots__ = ("explanation", "model", "stain")
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAIN_FIELD_NUMBER: _ClassVar[int]
    explanation: PatchExplanation
    model: ModelRef
    stain: AppliedStainNormalization
    def __init__(self, explanation: _Optional[_Union[PatchExplanation, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., stain: _Optional[_Union[AppliedStainNormalization, _Mapping]] = ...) -> None: ...

class UploadSlideMetadata(_message.Message):
    __slots__ = ("size_bytes", "sha256_hex", "suffix")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_HEX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    sha256_hex: str
    suffix: str
    def __init__(self, size_bytes: _Optional[int] = ..., sha256_hex: _Optional[str] = ..., suffix: _Optional[str] = ...) -> None: ...

class UploadSlideRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadSlideMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[UploadSlideMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadSlideResponse(_message.Message):
    __slots__ = ("upload_id", "size_bytes", "sha256_hex", "expires_in_s")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_HEX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    size_bytes: int
    sha256_hex: str
    expires_in_s: float
    def __init__(self, upload_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256_hex: _Optional[str] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class StoreDicomRequest(_message.Message):
    __slots__ = ("dicomweb_server", "instance_size_bytes", "chunk")
    DICOMWEB_SERVER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    dicomweb_server: str
    instance_size_bytes: int
    chunk: bytes
    def __init__(self, dicomweb_server: _Optional[str] = ..., instance_size_bytes: _Optional[int] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class StoreDicomResponse(_message.Message):
    __slots__ = ("dicomweb_server", "sop_instance_uids")
    DICOMWEB_SERVER_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UIDS_FIELD_NUMBER: _ClassVar[int]
    dicomweb_server: str
    sop_instance_uids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dicomweb_server: _Optional[str] = ..., sop_instance_uids: _Optional[_Iterable[str]] = ...) -> None: ...

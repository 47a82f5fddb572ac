"""Video data for vdit: the ``moving_shapes`` benchmark, folders of videos, TFDS catalog
datasets, and a checkpointable Grain pipeline that serves sharded global batches.

All datasets are TFDS datasets in ``array_record`` files built and read without
TensorFlow (only ``tfds:`` catalog datasets need it). See ``vdit.data.pipeline``.
"""

from vdit.data.common import (
    DatasetNotPreparedError,
    MissingTensorFlowError,
    SplitNotFoundError,
    default_data_dir,
)
from vdit.data.folder import prepare_folder
from vdit.data.moving_shapes import (
    ATTRIBUTES,
    COLORS,
    DIRECTIONS,
    HELDOUT_COMBOS,
    SHAPES,
    TRAIN_COMBOS,
    prepare_moving_shapes,
)
from vdit.data.pipeline import (
    VideoDataset,
    describe,
    make_loader,
    normalize_video,
    open_dataset,
    to_global,
)

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "DIRECTIONS",
    "HELDOUT_COMBOS",
    "SHAPES",
    "TRAIN_COMBOS",
    "DatasetNotPreparedError",
    "MissingTensorFlowError",
    "SplitNotFoundError",
    "VideoDataset",
    "default_data_dir",
    "describe",
    "make_loader",
    "normalize_video",
    "open_dataset",
    "prepare_folder",
    "prepare_moving_shapes",
    "to_global",
]

"""Data: dataset registry, long-tail profiles, client partitions and per-client views.

Datasets load once into arrays (:class:`RawDataset`); everything downstream works on index
arrays into them, so a client never holds a copy of the data. The registries (:data:`DATASETS`,
:data:`PROFILES`, :data:`PARTITIONS`) declare each choice once, with its parameters.
"""

from fedlt.data.clients import class_counts, client_class_counts, local_test_views
from fedlt.data.datasets import (
    DATASET_NAMES,
    DATASETS,
    estimate_bytes,
    known_train_size,
    load_dataset,
    to_tensor,
)
from fedlt.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderError, default_cache_dir, load_imagefolder
from fedlt.data.longtail import (
    PROFILES,
    exponential_counts,
    long_tail_counts,
    step_counts,
    subsample_long_tail,
)
from fedlt.data.partition import (
    PARTITIONS,
    partition,
    partition_dirichlet,
    partition_dirichlet_equal,
    partition_iid,
    partition_shards,
)
from fedlt.data.raw import RawDataset, RawSplit, stratified_split

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "PARTITIONS",
    "PROFILES",
    "ImageFolderError",
    "RawDataset",
    "RawSplit",
    "class_counts",
    "client_class_counts",
    "default_cache_dir",
    "estimate_bytes",
    "exponential_counts",
    "known_train_size",
    "load_dataset",
    "load_imagefolder",
    "local_test_views",
    "long_tail_counts",
    "partition",
    "partition_dirichlet",
    "partition_dirichlet_equal",
    "partition_iid",
    "partition_shards",
    "step_counts",
    "stratified_split",
    "subsample_long_tail",
    "to_tensor",
]

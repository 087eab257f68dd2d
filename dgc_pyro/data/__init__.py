"""Data for DGC: dataset readers, .npz files, the paper's imbalance protocol, splits and input validation."""

from .npz import NPZ_DATASET_FORMAT, load_npz, load_npz_examples, read_npz
from .protocol import DIGITS_COUNTS, PAPER_COUNTS, dev_indices, imbalanced_indices, parse_counts
from .sources import DATASET_REGISTRY, DATASETS, DatasetSpec, ImageSource, default_counts, open_source
from .splits import EVALUATION_SETS, ImbalancedSplit, load_imbalanced, split_from_arrays, stratified_holdout
from .transforms import TRANSFORMS, random_hflip, random_shift, resolve_transform, shift_flip
from .validation import check_features, check_labels, check_xy

__all__ = [
    "DATASETS",
    "DATASET_REGISTRY",
    "DIGITS_COUNTS",
    "EVALUATION_SETS",
    "NPZ_DATASET_FORMAT",
    "PAPER_COUNTS",
    "TRANSFORMS",
    "DatasetSpec",
    "ImageSource",
    "ImbalancedSplit",
    "check_features",
    "check_labels",
    "check_xy",
    "default_counts",
    "dev_indices",
    "imbalanced_indices",
    "load_imbalanced",
    "load_npz",
    "load_npz_examples",
    "open_source",
    "parse_counts",
    "random_hflip",
    "random_shift",
    "read_npz",
    "resolve_transform",
    "shift_flip",
    "split_from_arrays",
    "stratified_holdout",
]

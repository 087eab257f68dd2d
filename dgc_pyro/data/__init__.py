"""Data for DGC: dataset readers, the paper's imbalance protocol, splits and input validation."""

from .protocol import DIGITS_COUNTS, PAPER_COUNTS, imbalanced_indices, parse_counts
from .sources import DATASETS, ImageSource, open_source
from .splits import ImbalancedSplit, load_imbalanced, split_from_arrays, stratified_holdout
from .transforms import TRANSFORMS, random_hflip, random_shift, resolve_transform, shift_flip
from .validation import check_features, check_labels, check_xy

__all__ = [
    "DATASETS",
    "DIGITS_COUNTS",
    "PAPER_COUNTS",
    "TRANSFORMS",
    "ImageSource",
    "ImbalancedSplit",
    "check_features",
    "check_labels",
    "check_xy",
    "imbalanced_indices",
    "load_imbalanced",
    "open_source",
    "parse_counts",
    "random_hflip",
    "random_shift",
    "resolve_transform",
    "shift_flip",
    "split_from_arrays",
    "stratified_holdout",
]

"""Data sets as tensors (``load_dataset``) and stratified training slices (``make_slices``)."""
from .arrays import ArrayDataset
from .datasets import DATASET_NAMES, DatasetMeta, load_dataset, resize_uint8
from ..errors import DataError, DatasetNotFoundError
from .slicing import SPLIT_SPECS, make_slices, split_spec

__all__ = [
    "DATASET_NAMES",
    "SPLIT_SPECS",
    "ArrayDataset",
    "DataError",
    "DatasetMeta",
    "DatasetNotFoundError",
    "load_dataset",
    "make_slices",
    "resize_uint8",
    "split_spec",
]

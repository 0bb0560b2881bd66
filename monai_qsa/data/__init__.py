from .datalist import label_values, load_datalist, prepare_dataset
from .folders import folder_datalist
from .synthetic import make_synthetic_dataset

__all__ = ["folder_datalist", "label_values", "load_datalist", "make_synthetic_dataset", "prepare_dataset"]

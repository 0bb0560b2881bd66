from .datalist import folder_datalist, load_datalist, prepare_dataset
from .synthetic import make_synthetic_dataset

__all__ = ["make_synthetic_dataset", "load_datalist", "prepare_dataset", "folder_datalist"]

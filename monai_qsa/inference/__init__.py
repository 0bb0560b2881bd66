from .batch import run_batch_inference
from .bundle_runner import BundleRunner, CaseError

__all__ = ["BundleRunner", "CaseError", "run_batch_inference"]

"""The paper's comparison, measured by the product: CNN vs SA, fp32 vs int8 (``python -m monai_qsa benchmark``)."""

from .run import MODELS, run_benchmark
from .tasks import BASELINES, BENCHMARK_TASKS, cnn_network_def

__all__ = ["run_benchmark", "MODELS", "BENCHMARK_TASKS", "BASELINES", "cnn_network_def"]

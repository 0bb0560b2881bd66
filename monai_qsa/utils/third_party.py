"""Quiet imports of third-party modules whose import-time messages read like a broken installation.

Importing torchao's PT2E quantiser on a CPU-only torch logs warnings that say nothing about what monai_qsa uses it
for: its CUDA extensions (``_C_mxfp8``, ``_C_cutlass_90a``) cannot be loaded, Triton (a GPU compiler) is missing,
and torch's pytree registry finds an enum registered the old way. :func:`quiet_import_noise` demotes exactly those
records (log records and Python warnings) to DEBUG records of this module's logger, only while the import runs;
every other message passes unchanged. Run with ``logging.DEBUG`` on ``monai_qsa.utils.third_party`` to see them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

__all__ = ["IMPORT_NOISE", "quiet_import_noise", "import_torchao_pt2e"]

#: (logger name, or ``"warnings"`` for Python warnings; pattern of the message) of each known import-time message
IMPORT_NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", r"^Failed to load .*torchao/_C_\w+[.\w-]*\.so"),  # CUDA-only extensions, unusable on a CPU torch
    ("torchao.kernel.intmm", r"Detected no triton"),  # Triton compiles GPU kernels; the CPU path does not use it
    ("torch.utils._pytree", r"is an Enum subclass .*register_constant\(\) on Enum subclasses is deprecated"),
    ("warnings", r"^`torch\.jit\.(script|script_method|interface)` is deprecated"),  # torchao's TorchScript helpers
)


class _DemoteToDebug(logging.Filter):
    """Drop the records whose message matches ``pattern`` after logging them again at DEBUG level."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.pattern.search(message) is None:
            return True
        logger.debug("%s (%s, hidden at import): %s", record.name, record.levelname, message)
        return False


def _demoting_showwarning(patterns: list[re.Pattern], show: Callable) -> Callable:
    """A ``warnings.showwarning`` that logs the warnings matching ``patterns`` at DEBUG level and passes the others
    to ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        if any(pattern.search(str(message)) for pattern in patterns):
            logger.debug("%s (%s:%s, hidden at import): %s", category.__name__, filename, lineno, message)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


@contextlib.contextmanager
def quiet_import_noise(noise: tuple[tuple[str, str], ...] = IMPORT_NOISE) -> Iterator[None]:
    """Demote the known import-time messages in ``noise`` to DEBUG records of this module's logger while the block
    runs; all other log records and warnings are emitted as usual.

    Args:
        noise: (logger name or ``"warnings"``, regular expression searched in the message) pairs.

    Example::

        with quiet_import_noise():
            import torchao.quantization.pt2e.quantize_pt2e
    """
    filters = [(logging.getLogger(name), _DemoteToDebug(pattern)) for name, pattern in noise if name != "warnings"]
    warning_patterns = [re.compile(pattern) for name, pattern in noise if name == "warnings"]
    for source, record_filter in filters:
        source.addFilter(record_filter)
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on exit
            warnings.showwarning = _demoting_showwarning(warning_patterns, warnings.showwarning)
            yield
    finally:
        for source, record_filter in filters:
            source.removeFilter(record_filter)


def import_torchao_pt2e() -> None:
    """Import torchao's PT2E quantisation modules (``prepare_pt2e``/``convert_pt2e`` and ``X86InductorQuantizer``,
    whose import registers the int8 lowering passes that loading and compiling int8 artifacts need), without the
    messages listed in :data:`IMPORT_NOISE`. Later imports of these modules are free and silent."""
    with quiet_import_noise():
        import torchao.quantization.pt2e.quantize_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

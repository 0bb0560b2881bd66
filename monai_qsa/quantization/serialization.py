"""One-file int8 artifacts: a torch.export program plus the metadata needed to run it; no arbitrary pickles.

The file is a zip archive holding ``program.pt2`` (``torch.export.save`` output, deflated: its graph description
is most of its size for small networks and compresses about 20x) and ``monai_qsa.json``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

import monai_qsa
from monai_qsa.quantization.ptq import InferenceGraph, export_for_quantization, quiet_ao_deprecations

__all__ = ["save_quantized", "load_quantized", "METADATA_FILE", "PROGRAM_FILE"]

METADATA_FILE = "monai_qsa.json"
PROGRAM_FILE = "program.pt2"


def save_quantized(path: str | os.PathLike, qmodel: nn.Module, example_inputs: torch.Tensor | tuple, metadata: dict | None = None) -> Path:
    """Save an int8 model from :func:`monai_qsa.quantization.quantize_ptq` as one ``torch.export`` file.

    Only the tensors the converted graph uses are stored (int8 weights, fp32 biases and attention embeddings);
    batch and spatial sizes stay dynamic. The file is written to a temporary name and renamed, so a failure
    never leaves a truncated artifact.

    Args:
        path: destination file (``.pt2`` by convention).
        qmodel: the int8 model.
        example_inputs: an input tensor or tuple of inputs the model accepts.
        metadata: extra JSON-serialisable entries (e.g. metric, labels); stored with the backend, input spec,
            and monai_qsa and torch versions.
    """
    path = Path(path)
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    backend = getattr(qmodel, "monai_qsa_backend", None)
    if not isinstance(qmodel, InferenceGraph):
        raise NotImplementedError(
            f"save_quantized stores torch.export programs; {backend} models hold torch.ao packed weights that "
            "torch.export cannot capture. Quantise with backend='x86_inductor' to get a deployable file."
        )
    info = {
        "backend": backend,
        "inputs": [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in example_inputs],
        "monai_qsa_version": monai_qsa.__version__,
        "torch_version": torch.__version__,
        **(metadata or {}),
    }
    with quiet_ao_deprecations():
        program = export_for_quantization(qmodel.program, example_inputs)
    _strip_debug_info(program)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr(PROGRAM_FILE, buffer.getvalue())
            archive.writestr(METADATA_FILE, json.dumps(info, indent=2))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _strip_debug_info(program: torch.export.ExportedProgram) -> None:
    """Drop what running the program does not need: per-node source locations and module paths (half of the
    serialized graph) and the example inputs ``torch.export.save`` would otherwise store."""
    for node in program.graph.nodes:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "torch_fn"):
            node.meta.pop(key, None)
    program._example_inputs = None


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """Load an int8 model written by :func:`save_quantized`, in any process.

    Returns:
        an :class:`~monai_qsa.quantization.ptq.InferenceGraph` usable as ``network`` in MONAI inferers and
        evaluators; its ``monai_qsa_metadata`` attribute holds the stored metadata. Compile it with ``compile_for_cpu(model, freezing=True)`` for speed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable monai_qsa int8 artifact.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 model file {path} does not exist.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {PROGRAM_FILE, METADATA_FILE} <= names:
                raise ValueError(f"it lacks {PROGRAM_FILE} or {METADATA_FILE} (holds {sorted(names)[:5]})")
            metadata = json.loads(archive.read(METADATA_FILE))
            program_bytes = archive.read(PROGRAM_FILE)
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  registers int8 lowering passes

        program = torch.export.load(io.BytesIO(program_bytes))
    except Exception as error:
        raise ValueError(f"{path} is not a readable monai_qsa int8 model: {type(error).__name__}: {error}") from error
    module = InferenceGraph(program.module(), metadata["backend"])
    module.monai_qsa_metadata = metadata
    return module

"""One-file int8 artifacts that are data only: loading one decodes JSON and raw tensor bytes and never unpickles,
imports, or runs anything the file names.

The file is a zip archive (format 2) holding:

- ``monai_qsa.json``: format version, backend, input spec, monai_qsa and torch versions, and the user's metadata;
- ``graph.json``: the ``torch.export`` ATen graph as a list of operator calls. Operators are named, not pickled,
  and resolved on load against an allow-list: ``torch.ops`` operators of the ``aten`` (minus the few that touch
  files or print), ``quantized_decomposed`` and ``monai_qsa`` namespaces that write to none of their arguments (no
  in-place, ``out=`` or storage-changing overloads such as ``set_``, ``resize_``, ``as_strided_``, ``copy_``), and
  integer arithmetic on sizes;
- ``tensors.bin``: the weights and constants as raw little-endian bytes, described (dtype, shape, offset) in
  ``graph.json``.

Format 1 files (a ``torch.export.save`` archive inside) are refused without being opened: ``torch.export.load``
unpickles payloads and evaluates expressions a crafted file chooses.
"""

from __future__ import annotations

import json
import keyword
import operator
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import monai_qsa
from monai_qsa.quantization.ptq import InferenceGraph
from monai_qsa.utils.files import atomic_write
from monai_qsa.utils.third_party import import_torchao_pt2e

__all__ = ["save_quantized", "load_quantized", "FORMAT_VERSION", "METADATA_FILE", "GRAPH_FILE", "TENSORS_FILE"]

FORMAT_VERSION = 2
METADATA_FILE = "monai_qsa.json"
GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.bin"
#: the member of format 1 files (``torch.export.save`` output)
_LEGACY_PROGRAM_FILE = "program.pt2"
#: the most bytes each member may expand to, and the highest compression ratio accepted for members over 1 MiB
#: (real graphs deflate about 20x, weights about 1.2x; zip bombs approach deflate's limit of about 1000x)
_MEMBER_LIMITS = {METADATA_FILE: 1 << 20, GRAPH_FILE: 1 << 28, TENSORS_FILE: 1 << 32}
_MAX_COMPRESSION_RATIO = 200
_TENSOR_ALIGNMENT = 64
_MAX_TENSOR_DIMS = 16

_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")
}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {
    name: getattr(torch, name) for name in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
}
_OPERATOR_NAMESPACES = ("aten", "quantized_decomposed", "monai_qsa")
#: ATen operators with effects outside the tensors they are given (files, stdout, warnings)
_DENIED_OPERATORS = frozenset({"aten.from_file", "aten.save", "aten._print", "aten.warn"})
#: operators that change a tensor's storage, sizes or strides in place; refused even if a schema did not say so
#: (they end in ``_`` too, which is refused as well)
_MUTATING_OPERATORS = frozenset({"aten.set_", "aten.resize_", "aten.as_strided_", "aten.copy_"})
#: Python functions export graphs call on symbolic sizes
_SIZE_FUNCTIONS = {
    f"operator.{name}": getattr(operator, name)
    for name in (
        "getitem",
        "add",
        "sub",
        "mul",
        "floordiv",
        "truediv",
        "mod",
        "neg",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "not_",
    )
} | {
    f"torch.{name}": getattr(torch, name)
    for name in ("sym_max", "sym_min", "sym_int", "sym_float", "sym_not", "sym_ite")
}
_SIZE_FUNCTION_NAMES = {function: name for name, function in _SIZE_FUNCTIONS.items()}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATTRIBUTE_PART = re.compile(r"[A-Za-z0-9_]+")
_OPERATOR_NAME = re.compile(r"([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")


class _InvalidArtifact(Exception):
    """Why a file is not a valid artifact; :func:`load_quantized` reports it as a ``ValueError`` naming the file."""


def save_quantized(
    path: str | os.PathLike, qmodel: nn.Module, example_inputs: torch.Tensor | tuple, metadata: dict | None = None
) -> Path:
    """Save an int8 model from :func:`monai_qsa.quantization.quantize_ptq` as one data-only file.

    Only the tensors the converted graph uses are stored (int8 weights, fp32 biases and attention embeddings);
    batch and spatial sizes stay dynamic. The file is written to a temporary name and renamed, so a failure
    never leaves a truncated artifact.

    Args:
        path: destination file (``.pt2`` by convention).
        qmodel: the int8 model.
        example_inputs: an input tensor or tuple of inputs the model accepts; their shapes and dtypes are stored as
            the input spec.
        metadata: extra JSON-serialisable entries (e.g. metric, labels); stored with the backend, input spec,
            format version, and monai_qsa and torch versions (which take precedence over entries of the same name).

    Raises:
        NotImplementedError: ``qmodel`` is not an ``x86_inductor`` graph, or its graph uses something the format
            cannot store (an operator outside the allow-list, state updated in place, a non-tensor output).
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
        **(metadata or {}),
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "inputs": [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in example_inputs],
        "monai_qsa_version": monai_qsa.__version__,
        "torch_version": torch.__version__,
    }
    graph, tensor_bytes = _encode_graph_module(qmodel.program)
    with (
        atomic_write(path) as partial,
        zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
    ):
        archive.writestr(METADATA_FILE, json.dumps(info, indent=2))
        archive.writestr(GRAPH_FILE, json.dumps(graph, separators=(",", ":")))
        archive.writestr(TENSORS_FILE, tensor_bytes)
    return path


def _encode_graph_module(graph_module: torch.fx.GraphModule) -> tuple[dict, bytes]:
    """The ``graph.json`` description of an int8 program (``quantize_ptq``'s, already an ATen graph from
    ``torch.export``, or one :func:`load_quantized` decoded) and the bytes of its tensors. Encoded as it is: exporting
    it again only to read it back took about a second per network."""
    if sys.byteorder != "little":
        raise NotImplementedError("int8 artifacts are written on little-endian machines only.")
    parameters = {name for name, _ in graph_module.named_parameters()}
    inputs, tensors, nodes, tensor_bytes = [], [], [], bytearray()
    first_of = {}  # stored tensor -> the get_attr node that stores it; later get_attr nodes of it stand for that one
    aliases = {}
    outputs = None
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
        elif node.op == "get_attr":
            if node.target in first_of:
                aliases[node.name] = first_of[node.target]
                continue
            first_of[node.target] = node.name
            value = operator.attrgetter(node.target)(graph_module)
            if not isinstance(value, torch.Tensor):
                raise NotImplementedError(f"int8 artifacts store tensors only, not {node.target} ({type(value)}).")
            tensor_bytes += b"\0" * (-len(tensor_bytes) % _TENSOR_ALIGNMENT)
            tensors.append(
                {
                    "node": node.name,
                    "attribute": node.target,
                    "parameter": node.target in parameters,
                    "dtype": str(value.dtype).removeprefix("torch."),
                    "shape": list(value.shape),
                    "offset": len(tensor_bytes),
                }
            )
            tensor_bytes += _tensor_bytes(value, node.target)
        elif node.op == "call_function":
            nodes.append(
                {
                    "name": node.name,
                    "target": _operator_name(node.target),
                    "args": _encode_value(list(node.args), aliases),
                    "kwargs": {key: _encode_value(value, aliases) for key, value in node.kwargs.items()},
                }
            )
        elif node.op == "output":
            outputs = node.args[0]
        elif not (node.op == "call_module" and node.target == "_guards_fn"):  # export's checks of the input sizes
            raise NotImplementedError(f"int8 artifacts store operator calls only, not {node.op} node {node.name}.")
    # programs from torch.export return their outputs flattened, with the structure in _out_spec
    out_spec = getattr(graph_module, "_out_spec", None)
    if isinstance(outputs, torch.fx.Node):
        outputs, single_output = [outputs], True
    elif out_spec is not None and not out_spec.is_leaf() and out_spec.type is not tuple:
        raise NotImplementedError(f"int8 artifacts store models returning a tensor or a tuple, not {out_spec}.")
    else:
        single_output = out_spec is not None and out_spec.is_leaf()
    graph = {
        "inputs": inputs,
        "tensors": tensors,
        "nodes": nodes,
        "outputs": _encode_value(list(outputs), aliases),
        "single_output": single_output,
    }
    return graph, bytes(tensor_bytes)


def _tensor_bytes(tensor: torch.Tensor, name: str) -> bytes:
    if type(tensor.data) is not torch.Tensor or str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
        raise NotImplementedError(f"int8 artifacts cannot store {name} ({type(tensor).__name__}, {tensor.dtype}).")
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _operator_name(target: Any) -> str:
    """The allow-listed name ``graph.json`` stores for a call target."""
    if target in _SIZE_FUNCTION_NAMES:
        return _SIZE_FUNCTION_NAMES[target]
    name = str(target)
    if not isinstance(target, torch._ops.OpOverload) or _resolve_operator(name) is not target:
        raise NotImplementedError(f"int8 artifacts cannot store a call to {name}: not an allow-listed torch operator.")
    return name


def _encode_value(value: Any, aliases: dict[str, str]) -> Any:
    """JSON for a node argument: scalars and strings as they are, containers element-wise, nodes by name (or the
    name ``aliases`` maps it to), anything else tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode_value(item, aliases) for item in value]
    if isinstance(value, torch.fx.Node):
        return {"node": aliases.get(value.name, value.name)}
    for tag, table in (("dtype", _DTYPES), ("layout", _LAYOUTS), ("memory_format", _MEMORY_FORMATS)):
        names = [name for name, known in table.items() if known == value]
        if names:
            return {tag: names[0]}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise NotImplementedError(f"int8 artifacts cannot store the graph argument {value!r} ({type(value).__name__}).")


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """Load an int8 model written by :func:`save_quantized`, in any process.

    Loading only decodes JSON and raw tensor bytes with monai_qsa's own code: nothing in the file is unpickled
    or executed, and the graph may call allow-listed tensor operators only.

    Returns:
        an :class:`~monai_qsa.quantization.ptq.InferenceGraph` usable as ``network`` in MONAI inferers and
        evaluators; its ``monai_qsa_metadata`` attribute holds the stored metadata. Compile it with
        ``compile_for_cpu(model, freezing=True)`` for speed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a monai_qsa int8 artifact of this format (the message says why), including
            files of an earlier format, which must be quantised again.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 model file {path} does not exist.")
    import_torchao_pt2e()  # registers Inductor's int8 lowering passes; its import notices go to DEBUG

    try:
        members = _read_members(path)
        metadata = _check_metadata(_parse_json(members[METADATA_FILE], METADATA_FILE))
        graph_module = _decode_graph(_parse_json(members[GRAPH_FILE], GRAPH_FILE), members[TENSORS_FILE])
    except RecursionError:
        raise ValueError(f"{path}: not a loadable monai_qsa int8 model: {GRAPH_FILE} nests too deeply.") from None
    except _InvalidArtifact as error:
        raise ValueError(f"{path}: not a loadable monai_qsa int8 model: {error}") from error
    module = InferenceGraph(graph_module, metadata["backend"])
    module.monai_qsa_metadata = metadata
    return module


def _read_members(path: Path) -> dict[str, bytearray]:
    """The three members of the zip archive, each read within its size limit."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if _LEGACY_PROGRAM_FILE in names:
                raise _InvalidArtifact(
                    "it was written by monai_qsa before int8 format 2 (it holds a torch.export program, which can run "
                    "code when loaded, so it is not opened); quantise the fp32 model again (quantize_ptq, then "
                    "save_quantized)."
                )
            if sorted(names) != sorted(_MEMBER_LIMITS):
                raise _InvalidArtifact(f"it must hold exactly {sorted(_MEMBER_LIMITS)}, not {sorted(names)[:8]}.")
            return {info.filename: _read_member(archive, info) for info in infos}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, RuntimeError) as error:
        raise _InvalidArtifact(f"not a readable zip archive ({type(error).__name__}: {error}).") from error


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    limit = _MEMBER_LIMITS[info.filename]
    if info.file_size > limit:
        raise _InvalidArtifact(f"{info.filename} would expand to {info.file_size} bytes, over the {limit}-byte limit.")
    if info.file_size > 1 << 20 and info.file_size > _MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise _InvalidArtifact(
            f"{info.filename} would expand {info.file_size // max(info.compress_size, 1)}-fold, more than a model "
            f"file does (limit {_MAX_COMPRESSION_RATIO}x): a zip bomb?"
        )
    data = bytearray(info.file_size)
    with archive.open(info) as member:  # stops at the declared size and checks the CRC
        if member.readinto(data) != info.file_size or member.read(1):
            raise _InvalidArtifact(f"{info.filename} does not hold the {info.file_size} bytes its header declares.")
    return data


def _parse_json(data: bytearray, name: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, too many digits, too deep
        raise _InvalidArtifact(f"{name} is not valid JSON ({error}).") from error
    if not isinstance(value, dict):
        raise _InvalidArtifact(f"{name} must hold a JSON object, not {type(value).__name__}.")
    return value


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is a ``kind`` (bools are not integers here), else an :class:`_InvalidArtifact` about ``what``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise _InvalidArtifact(f"{what} must be {expected}, not {type(value).__name__} {str(value)[:80]!r}.")
    return value


def _check_metadata(metadata: dict) -> dict:
    """``metadata`` after checking the entries :func:`save_quantized` writes and :func:`load_quantized` reads."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        later = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise _InvalidArtifact(
            f"{METADATA_FILE} declares format_version {version!r}; this monai_qsa reads format {FORMAT_VERSION}"
            + (": update monai_qsa." if later else ": quantise the fp32 model again.")
        )
    for key in ("backend", "monai_qsa_version", "torch_version"):
        _expect(metadata.get(key), str, f"{METADATA_FILE} entry {key!r}")
    if metadata["backend"] != "x86_inductor":
        raise _InvalidArtifact(f"{METADATA_FILE} names backend {metadata['backend']!r}, not 'x86_inductor'.")
    for index, spec in enumerate(_expect(metadata.get("inputs"), list, f"{METADATA_FILE} entry 'inputs'")):
        _expect(spec, dict, f"{METADATA_FILE} inputs[{index}]")
        for size in _expect(spec.get("shape"), list, f"{METADATA_FILE} inputs[{index}]['shape']"):
            _expect(size, int, f"{METADATA_FILE} inputs[{index}]['shape'] entries")
        _expect(spec.get("dtype"), str, f"{METADATA_FILE} inputs[{index}]['dtype']")
    return metadata


def _decode_graph(graph_json: dict, tensor_data: bytearray) -> torch.fx.GraphModule:
    """The graph module described by ``graph.json``, holding the tensors of ``tensors.bin``."""
    root, graph, values = nn.Module(), torch.fx.Graph(), {}
    for name in _expect(graph_json.get("inputs"), list, f"{GRAPH_FILE} 'inputs'"):
        _define(values, name, graph.placeholder(_identifier(name, "input name")))
    for index, record in enumerate(_expect(graph_json.get("tensors"), list, f"{GRAPH_FILE} 'tensors'")):
        record = _expect(record, dict, f"{GRAPH_FILE} tensors[{index}]")
        attribute = _attribute_path(record.get("attribute"))
        _attach_tensor(root, attribute, _decode_tensor(record, tensor_data, attribute), record.get("parameter"))
        _define(values, record.get("node"), graph.get_attr(attribute))
    for index, node in enumerate(_expect(graph_json.get("nodes"), list, f"{GRAPH_FILE} 'nodes'")):
        node = _expect(node, dict, f"{GRAPH_FILE} nodes[{index}]")
        name = _identifier(node.get("name"), f"nodes[{index}] name")
        target = _resolve_target(node.get("target"))
        args = _decode_value(_expect(node.get("args"), list, f"node {name} args"), values)
        kwargs = {
            _identifier(key, f"node {name} keyword"): _decode_value(value, values)
            for key, value in _expect(node.get("kwargs"), dict, f"node {name} kwargs").items()
        }
        _define(values, name, graph.call_function(target, tuple(args), kwargs))
    outputs = _decode_value(_expect(graph_json.get("outputs"), list, f"{GRAPH_FILE} 'outputs'"), values)
    if _expect(graph_json.get("single_output"), bool, f"{GRAPH_FILE} 'single_output'") and len(outputs) != 1:
        raise _InvalidArtifact(f"{GRAPH_FILE} declares a single output but lists {len(outputs)}.")
    graph.output(outputs[0] if graph_json["single_output"] else tuple(outputs))
    try:
        graph.lint()
        return torch.fx.GraphModule(root, graph)
    except Exception as error:  # fx's own consistency checks, on a graph built only from allow-listed parts
        raise _InvalidArtifact(f"{GRAPH_FILE} is not a valid graph ({type(error).__name__}: {error}).") from error


def _define(values: dict, name: Any, node: torch.fx.Node) -> None:
    name = _identifier(name, "graph value name")
    if name in values:
        raise _InvalidArtifact(f"{GRAPH_FILE} defines {name!r} twice.")
    values[name] = node


def _identifier(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name) or keyword.iskeyword(name):
        raise _InvalidArtifact(f"{GRAPH_FILE} {what} {str(name)[:80]!r} is not a Python identifier.")
    return name


def _attribute_path(name: Any) -> str:
    """A dotted module path such as ``encoder.0.conv.weight``, with no dunder or reserved ``nn.Module`` name."""
    parts = name.split(".") if isinstance(name, str) else [None]
    if not all(isinstance(p, str) and _ATTRIBUTE_PART.fullmatch(p) and not p.startswith("__") for p in parts):
        raise _InvalidArtifact(f"{GRAPH_FILE} tensor attribute {str(name)[:80]!r} is not a dotted module path.")
    if hasattr(torch.fx.GraphModule, parts[0]):
        raise _InvalidArtifact(f"{GRAPH_FILE} tensor attribute {name!r} would replace GraphModule.{parts[0]}.")
    return name


def _decode_tensor(record: dict, data: bytearray, name: str) -> torch.Tensor:
    """The tensor of a ``tensors`` record: ``numel`` elements of ``dtype`` at ``offset`` in ``tensors.bin``."""
    dtype = _DTYPES.get(record.get("dtype"))
    if dtype is None:
        raise _InvalidArtifact(f"tensor {name}: dtype {str(record.get('dtype'))[:20]!r}, not one of {list(_DTYPES)}.")
    shape = _expect(record.get("shape"), list, f"tensor {name} shape")
    for size in shape:
        _expect(size, int, f"tensor {name} shape entries")
    offset = _expect(record.get("offset"), int, f"tensor {name} offset")
    if any(size < 0 for size in shape) or offset < 0 or len(shape) > _MAX_TENSOR_DIMS:
        raise _InvalidArtifact(
            f"tensor {name}: negative size or offset, or too many dimensions ({str(shape)[:80]}, {offset})."
        )
    numel = 1
    for size in shape:
        numel *= size
    end = offset + numel * dtype.itemsize
    if end > len(data):
        raise _InvalidArtifact(
            f"tensor {name} ({shape}, {dtype}) at byte {offset} overruns {TENSORS_FILE} ({len(data)} bytes)."
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=offset).reshape(shape).clone()


def _attach_tensor(root: nn.Module, attribute: str, tensor: torch.Tensor, parameter: Any) -> None:
    """Register ``tensor`` on ``root`` at the dotted ``attribute``, creating the submodules on the way."""
    *path, leaf = attribute.split(".")
    module = root
    try:
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        if _expect(parameter, bool, f"tensor {attribute} 'parameter'"):
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(leaf, tensor)
    except (KeyError, TypeError, AttributeError) as error:
        raise _InvalidArtifact(f"tensor attribute {attribute!r} clashes with another one ({error}).") from error


def _resolve_target(name: Any) -> Any:
    if isinstance(name, str) and name in _SIZE_FUNCTIONS:
        return _SIZE_FUNCTIONS[name]
    return _resolve_operator(name)


def _resolve_operator(name: Any) -> torch._ops.OpOverload:
    """The allow-listed ``torch.ops`` operator ``namespace.name.overload`` (looked up in torch's registry)."""
    match = _OPERATOR_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or match[1] not in _OPERATOR_NAMESPACES or f"{match[1]}.{match[2]}" in _DENIED_OPERATORS:
        raise _InvalidArtifact(
            f"{GRAPH_FILE} calls {str(name)[:80]!r}, which is not allowed: graphs may call torch operators of "
            f"{_OPERATOR_NAMESPACES} and size arithmetic only."
        )
    if match[2].endswith("_") or f"{match[1]}.{match[2]}" in _MUTATING_OPERATORS:
        raise _InvalidArtifact(
            f"{GRAPH_FILE} calls {name}, an in-place operator, which is not allowed: graphs may call operators that "
            "write to none of their arguments only."
        )
    try:
        operator_overload = getattr(getattr(getattr(torch.ops, match[1]), match[2]), match[3])
    except (AttributeError, RuntimeError) as error:
        raise _InvalidArtifact(f"{GRAPH_FILE} calls {name}, which this torch does not have ({error}).") from error
    if not isinstance(operator_overload, torch._ops.OpOverload):
        raise _InvalidArtifact(f"{GRAPH_FILE} calls {name}, which is not an operator overload.")
    schema = operator_overload._schema
    if schema.is_mutable or any(argument.is_out for argument in schema.arguments):
        raise _InvalidArtifact(
            f"{GRAPH_FILE} calls {name}, which writes to its arguments (an in-place or out= overload) and is not "
            "allowed: graphs may call operators that write to none of their arguments only."
        )
    return operator_overload


def _decode_value(value: Any, values: dict[str, torch.fx.Node]) -> Any:
    """A node argument from its :func:`_encode_value` JSON; graph values must be defined before they are used."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode_value(item, values) for item in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise _InvalidArtifact(f"{GRAPH_FILE} holds an argument it cannot decode: {str(value)[:80]!r}.")
    ((tag, content),) = value.items()
    if tag == "node":
        if content not in values:
            raise _InvalidArtifact(f"{GRAPH_FILE} uses {str(content)[:80]!r} before defining it.")
        return values[content]
    if tag == "device":
        try:
            return torch.device(_expect(content, str, "device"))
        except RuntimeError as error:
            raise _InvalidArtifact(f"{GRAPH_FILE} names device {content[:40]!r} ({error}).") from error
    table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}.get(tag, {})
    if not isinstance(content, str) or content not in table:
        raise _InvalidArtifact(f"{GRAPH_FILE} holds an argument it cannot decode: {str(value)[:80]!r}.")
    return table[content]

"""int8 artifacts are data: a hostile file cannot make ``load_quantized`` unpickle, import or run anything, and a
malformed one is refused with a ``ValueError`` that names the file and says what is wrong."""

import contextlib
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from monai_qsa.networks import SAUNet
from monai_qsa.quantization import load_quantized, quantize_ptq, save_quantized
from monai_qsa.quantization.serialization import GRAPH_FILE, METADATA_FILE, TENSORS_FILE
from monai_qsa.utils.compile import compile_for_cpu, run_mode

#: audit events an unpickler or a spawned command raises; recorded while _AUDITED is set
_WATCHED_EVENTS = {"pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn"}
_AUDITED: list[tuple[str, tuple]] | None = None


def _audit(event: str, args: tuple) -> None:
    if _AUDITED is not None and event in _WATCHED_EVENTS:
        _AUDITED.append((event, args))


class _Payload:
    """Unpickling this creates ``marker``: what a hostile file would use to run any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """A genuine artifact of a tiny SAUNet written by ``save_quantized``, the in-memory int8 model, and an input."""
    torch.manual_seed(0)
    net = SAUNet(2, 1, 2, features=(8, 16), num_heads=2, kernel_size=3).eval()
    x = torch.randn(2, 1, 16, 16)
    qmodel = quantize_ptq(net, [x], x)
    path = tmp_path_factory.mktemp("int8") / "model_int8.pt2"
    save_quantized(path, qmodel, x, metadata={"labels": ["a", "b"]})
    return path, qmodel, x


def _members(path_or_bytes: Path | bytes) -> dict[str, bytes]:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with zipfile.ZipFile(source) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _write(path: Path, members: dict[str, bytes]) -> Path:
    path.write_bytes(_zip_bytes(members))
    return path


def _edit_json(members: dict[str, bytes], name: str, edit) -> dict[str, bytes]:
    """``members`` with the JSON member ``name`` passed through ``edit`` (which changes it in place)."""
    document = json.loads(members[name])
    edit(document)
    return {**members, name: json.dumps(document).encode()}


def _load_fails(path: Path, *reasons: str) -> str:
    """``load_quantized(path)`` raises a ValueError naming ``path`` and giving each of ``reasons``."""
    with pytest.raises(ValueError) as error:
        load_quantized(path)
    message = str(error.value)
    assert str(path) in message and all(reason in message for reason in reasons), message
    return message


def test_loading_never_unpickles_and_the_model_compiles_with_the_fused_attention(artifact):
    global _AUDITED
    path, qmodel, x = artifact
    sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records while _AUDITED is a list
    _AUDITED = []
    try:
        model = load_quantized(path)
    finally:
        events, _AUDITED = _AUDITED, None
    assert events == []
    assert model.monai_qsa_metadata["labels"] == ["a", "b"] and model.monai_qsa_metadata["format_version"] == 2
    graph = model.program.graph
    attention = {
        torch.ops.monai_qsa.local_attention.default,
        torch.ops.monai_qsa.local_attention_int8.default,
        torch.ops.monai_qsa.projected_local_attention_int8.default,
    }
    expected_cores = sum(n.target in attention for n in qmodel.program.graph.nodes)
    assert sum(n.target in attention for n in graph.nodes) == expected_cores > 0
    compiled = compile_for_cpu(model, freezing=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), qmodel(x))
        y = torch.randn(1, 1, 20, 24)  # batch and image sizes stay dynamic
        torch.testing.assert_close(model(y), qmodel(y))
        torch.testing.assert_close(compiled(x), qmodel(x), atol=0.05, rtol=0.05)
    assert run_mode(compiled) == "compiled"


def _torch_export_archive(plant: str, payload: bytes) -> bytes:
    """A ``torch.export.save`` archive with a pickled ``payload`` planted where ``torch.export.load`` unpickles."""

    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    buffer = io.BytesIO()
    torch.export.save(torch.export.export(Scale(), (torch.ones(3),)), buffer)
    members = _members(buffer.getvalue())
    weights_config = "archive/data/weights/model_weights_config.json"
    constants_config = "archive/data/constants/model_constants_config.json"
    if plant == "weights":
        members = _edit_json(members, weights_config, lambda c: c["config"]["weight"].update(use_pickle=True))
        members["archive/data/weights/weight_0"] = payload
    elif plant in ("constants", "opaque_object"):
        path_name = "tensor_0" if plant == "constants" else "opaque_obj_0"
        entry = {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}
        members = _edit_json(members, constants_config, lambda c: c["config"].update(planted=entry))
        members[f"archive/data/constants/{path_name}"] = payload
    else:  # the example inputs stored with the program
        members["archive/data/sample_inputs/model.pt"] = payload
    return _zip_bytes(members)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load reading the planted example inputs
@pytest.mark.parametrize("plant", ["weights", "constants", "opaque_object", "example_inputs"])
def test_pickle_planted_in_a_torch_export_artifact_is_never_run(tmp_path, plant):
    marker = tmp_path / "marker"
    program = _torch_export_archive(plant, pickle.dumps(_Payload(marker)))
    # the planted archive is live: torch.export.load runs the payload (which is why monai_qsa never calls it)
    with contextlib.suppress(Exception):  # torch may fail after the payload ran, on the object it returned
        torch.export.load(io.BytesIO(program))
    assert marker.exists()
    marker.unlink()
    metadata = {"backend": "x86_inductor", "inputs": [], "monai_qsa_version": "0.1", "torch_version": "2.13"}
    hostile = _write(tmp_path / "model_int8.pt2", {"program.pt2": program, METADATA_FILE: json.dumps(metadata)})
    _load_fails(hostile, "before int8 format 2", "can run code", "quantise the fp32 model again")
    assert not marker.exists()


def test_pickle_in_place_of_the_tensor_bytes_is_read_as_numbers_only(artifact, tmp_path):
    marker = tmp_path / "marker"
    members = {**_members(artifact[0]), TENSORS_FILE: pickle.dumps(_Payload(marker))}
    hostile = _write(tmp_path / "model_int8.pt2", members)
    _load_fails(hostile, "overruns tensors.bin")
    assert not marker.exists()


@pytest.mark.parametrize(
    "target",
    [
        "builtins.exec",
        "torch.os.system",
        "posix.system",
        "torch.load",
        "aten.save.default",
        "aten.from_file.default",
        "torch.ops.aten.relu.default",
        "aten.relu.__call__",
        "aten.no_such_op.default",
    ],
)
def test_graph_calling_anything_but_allowed_operators_is_refused(artifact, tmp_path, target):
    members = _edit_json(_members(artifact[0]), GRAPH_FILE, lambda graph: graph["nodes"][0].update(target=target))
    _load_fails(_write(tmp_path / "model_int8.pt2", members), "calls", target)


@pytest.mark.parametrize(
    "edit, reason",
    [
        # fx writes keywords, names and attribute paths into the Python source of forward()
        (lambda g: g["nodes"][0]["kwargs"].update({"x=__import__('os').system('id'),y": 1}), "not a Python identifier"),
        (lambda g: g["nodes"][0].update(name="a; import os"), "not a Python identifier"),
        (lambda g: g["inputs"].__setitem__(0, "x): import os #"), "not a Python identifier"),
        (lambda g: g["tensors"][0].update(attribute="__class__"), "not a dotted module path"),
        (lambda g: g["tensors"][0].update(attribute="forward"), "would replace GraphModule.forward"),
        (lambda g: g["tensors"][0].update(attribute="training"), "clashes"),
        (lambda g: g["nodes"][0]["args"].__setitem__(0, {"node": "defined_later"}), "before defining it"),
        (lambda g: g["nodes"][0]["args"].__setitem__(0, {"pickle": "gASVAAAA"}), "cannot decode"),
        (lambda g: g["nodes"][0]["args"].__setitem__(0, {"dtype": "object"}), "cannot decode"),
        (lambda g: g["tensors"][0].update(dtype="object"), "dtype 'object'"),
        (lambda g: g["tensors"][0].update(shape=[1 << 40]), "overruns tensors.bin"),
        (lambda g: g["tensors"][0].update(offset=-8), "negative size or offset"),
        (lambda g: g["tensors"][0].update(shape=[1] * 17), "too many dimensions"),
        (lambda g: g["tensors"][0].update(shape="3"), "shape must be list"),
        (lambda g: g.update(nodes={}), "'nodes' must be list"),
        (lambda g: g.update(single_output="yes"), "'single_output' must be bool"),
    ],
    ids=[
        "keyword",
        "node-name",
        "input-name",
        "dunder-attribute",
        "forward-attribute",
        "training-attribute",
        "forward-reference",
        "unknown-tag",
        "dtype-argument",
        "tensor-dtype",
        "tensor-size",
        "tensor-offset",
        "tensor-dims",
        "shape-type",
        "nodes-type",
        "output-flag",
    ],
)
def test_malformed_graph_is_refused(artifact, tmp_path, edit, reason):
    members = _edit_json(_members(artifact[0]), GRAPH_FILE, edit)
    _load_fails(_write(tmp_path / "model_int8.pt2", members), reason)


def _replace_metadata(data: bytes):
    return lambda members: {**members, METADATA_FILE: data}


def _edit_metadata(edit):
    return lambda members: _edit_json(members, METADATA_FILE, edit)


@pytest.mark.parametrize(
    "rewrite, reasons",
    [
        (_replace_metadata(b"[1, 2]"), ["monai_qsa.json must hold a JSON object, not list"]),
        (_replace_metadata(b'{"backend": '), ["monai_qsa.json is not valid JSON"]),
        (_replace_metadata(b'{"backend": "\xff"}'), ["monai_qsa.json is not valid JSON"]),
        (_edit_metadata(lambda m: m.pop("backend")), ["'backend' must be str, not NoneType"]),
        (_edit_metadata(lambda m: m.update(backend=["x86_inductor"])), ["'backend' must be str, not list"]),
        (_edit_metadata(lambda m: m.update(backend="x86_eager")), ["backend 'x86_eager'"]),
        (_edit_metadata(lambda m: m.update(inputs="x")), ["'inputs' must be list"]),
        (_edit_metadata(lambda m: m["inputs"][0].update(shape=[2, "1"])), ["['shape'] entries must be int"]),
        (_edit_metadata(lambda m: m.pop("format_version")), ["format_version None", "quantise the fp32 model again"]),
        (_edit_metadata(lambda m: m.update(format_version=3)), ["format_version 3", "update monai_qsa"]),
        (lambda members: {k: v for k, v in members.items() if k != GRAPH_FILE}, ["must hold exactly"]),
        (lambda members: {**members, "extra.pkl": b"x"}, ["must hold exactly"]),
        (lambda members: {**members, METADATA_FILE: b" " * (2 << 20)}, ["over the 1048576-byte limit"]),
        (lambda members: {**members, GRAPH_FILE: b" " * (16 << 20)}, ["zip bomb"]),
    ],
    ids=[
        "not-object",
        "truncated-json",
        "not-utf8",
        "no-backend",
        "backend-type",
        "backend-value",
        "inputs-type",
        "shape-type",
        "no-version",
        "later-version",
        "missing-member",
        "extra-member",
        "huge-member",
        "zip-bomb",
    ],
)
def test_malformed_metadata_or_archive_is_refused(artifact, tmp_path, rewrite, reasons):
    _load_fails(_write(tmp_path / "model_int8.pt2", rewrite(_members(artifact[0]))), *reasons)


def test_files_that_are_not_zip_archives_are_refused(artifact, tmp_path):
    text = tmp_path / "notes.pt2"
    text.write_text("not a zip")
    _load_fails(text, "not a readable zip archive")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(artifact[0].read_bytes()[:-200])
    _load_fails(truncated, "not a readable zip archive")


def _edit_first_attention(edit):
    """A ``graph.json`` edit that passes the first ``projected_local_attention_int8`` node to ``edit`` (arguments:
    0 input, 1 weight, 2 bias, 3 table, 4 kernel_size, 5 dilation, 6 scale, 7-9 q/k/v scales)."""

    def apply(graph: dict) -> None:
        edit(next(n for n in graph["nodes"] if n["target"] == "monai_qsa.projected_local_attention_int8.default"))

    return apply


def _to_attention(target: str, kernel_size: int):
    """Turn the node into a call of ``target`` (the fp32 or the unfused int8 attention) of the layer's input and the
    table with ``kernel_size``."""

    def edit(node: dict) -> None:
        args = node["args"]
        scales = args[7:] if "int8" in target else []
        node.update(target=target, args=[args[0], args[3], kernel_size, *args[5:7], *scales])

    return edit


def _set(index: int, value):
    def edit(node: dict) -> None:
        node["args"][index] = node["args"][value[0]] if isinstance(value, tuple) else value

    return edit


@pytest.mark.parametrize(
    "edit, reason",
    [
        # a table of kernel size 3 with kernel_size 31: the C kernel would read far past the table and the images
        (_set(4, 31), "table must have shape"),
        # the fp32 or unfused int8 attention of the layer's input (not a projection), or with a table of kernel 3
        (_to_attention("monai_qsa.local_attention.default", 3), "qkv must be a floating-point tensor"),
        (_to_attention("monai_qsa.local_attention_int8.default", 31), "qkv must be a floating-point tensor"),
        (_set(4, 4), "kernel_size must be odd"),
        (_set(5, 0), "dilation must be between 1"),
        (_set(6, float("inf")), "scale must be a finite number"),
        (_set(7, -1.0), "q_scale must be a positive finite int8 scale"),
        # tensors where others should be (tuples: the argument of that index)
        (_set(3, (0,)), "table must be"),
        (_set(0, (3,)), "x must be"),
        (_set(1, (3,)), "weight must be"),
        (_set(2, (3,)), "bias must have shape"),
        (_set(1, (0,)), "weight must be"),
    ],
    ids=["kernel-size", "fp32-attention", "int8-attention", "even-kernel", "dilation", "scale", "int8-scale",
         "input-as-table", "table-as-input", "table-as-weight", "table-as-bias", "input-as-weight"],
)  # fmt: skip
def test_attention_call_with_mismatched_arguments_fails_with_a_value_error(artifact, tmp_path, edit, reason):
    path, _, x = artifact
    members = _edit_json(_members(path), GRAPH_FILE, _edit_first_attention(edit))
    model = load_quantized(_write(tmp_path / "model_int8.pt2", members))  # arguments are checked when called
    with torch.no_grad(), pytest.raises(ValueError, match=reason):
        model(x)


@pytest.mark.parametrize(
    "target",
    [
        "aten.relu_.default",
        "aten.set_.source_Tensor",
        "aten.resize_.default",
        "aten.as_strided_.default",
        "aten.copy_.default",
        "aten.add.out",
        "aten.relu.out",
        "aten.max_pool2d_with_indices_backward.grad_input",
    ],
)
def test_graph_calling_an_operator_that_writes_to_its_arguments_is_refused(artifact, tmp_path, target):
    def edit(graph: dict) -> None:
        next(n for n in graph["nodes"] if n["target"] == "aten.relu.default").update(target=target)

    members = _edit_json(_members(artifact[0]), GRAPH_FILE, edit)
    _load_fails(_write(tmp_path / "model_int8.pt2", members), "calls", target, "write to none of their arguments")


def test_genuine_graphs_call_no_operator_that_writes_to_its_arguments(artifact):
    graph = json.loads(_members(artifact[0])[GRAPH_FILE])
    targets = {node["target"] for node in graph["nodes"]}
    assert "aten.relu.default" in targets and not [t for t in targets if t.split(".")[1].endswith("_")]

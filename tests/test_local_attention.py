"""The fused attention kernel (``torch.ops.monai_qsa.local_attention``): same function as the differentiable
reference, its fall-backs, and its capture by torch.export / torch.compile."""

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from monai_qsa.networks.blocks import StandAloneSelfAttention
from monai_qsa.networks.blocks.local_attention import (
    _FLAGS,
    _SOURCE,
    _artifact_key,
    _compiler_key,
    _kernels,
    _thread_count,
    compiled_library,
    fused_kernel_available,
    kernel_cache_dir,
    local_attention_forward,
    local_attention_reference,
)
from monai_qsa.networks.nets import SAUNet
from monai_qsa.utils.compile import find_compiler

CASES = [
    # dims, in, out, kernel, heads, stride, dilation, spatial: rows longer than the kernel's 64-position block,
    # odd sizes, dilation, stride and a 3D 7x7x7 neighbourhood (343 neighbours)
    (2, 3, 16, 7, 4, 1, 1, (9, 150)),
    (2, 4, 12, 5, 3, 1, 2, (13, 67)),
    (2, 2, 8, 3, 2, 2, 1, (10, 12)),
    (3, 3, 12, 3, 2, 1, 1, (6, 7, 70)),
    (3, 2, 8, 7, 2, 1, 1, (5, 6, 9)),
    (3, 4, 16, 5, 4, 2, 2, (6, 8, 8)),
]


def randomised_layer(dims, cin, cout, ksize, heads, stride, dil) -> StandAloneSelfAttention:
    layer = StandAloneSelfAttention(dims, cin, cout, ksize, heads, stride=stride, dilation=dil, qkv_bias=True).eval()
    with torch.no_grad():
        for embedding in layer.rel_pos:
            embedding.normal_()  # make the relative term matter
    return layer


def test_kernel_builds_here():
    assert fused_kernel_available(), "the test machine has gcc: the fused kernel must build"
    assert any((Path(os.environ["MONAI_QSA_CACHE_DIR"]) / "kernels").glob("*/*.so"))


@pytest.mark.parametrize("dims,cin,cout,ksize,heads,stride,dil,spatial", CASES)
def test_fused_inference_equals_differentiable_path(dims, cin, cout, ksize, heads, stride, dil, spatial):
    layer = randomised_layer(dims, cin, cout, ksize, heads, stride, dil)
    x = torch.randn((2, cin) + spatial)
    with torch.no_grad():
        # requesting the attention selects the PyTorch reference (test_sasa checks it against brute force)
        reference = layer(x, return_attention=True)[0]
        torch.testing.assert_close(layer(x), reference, atol=2e-5, rtol=1e-4)
        # logits in the thousands (peaked softmax, exp underflow): finite, and equal up to fp32 conditioning
        scaled = layer(100 * x)
        assert torch.isfinite(scaled).all()
        torch.testing.assert_close(scaled, layer(100 * x, return_attention=True)[0], atol=5e-2, rtol=1e-2)


def test_thread_count_does_not_change_the_result():
    # every output position is computed by one thread in a fixed order: bitwise equal for any thread count
    qkv, table = torch.randn(3, 3, 2, 4, 17, 90), torch.randn(2, 5, 4)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert _thread_count(qkv.shape, 5) == threads
            results.append(torch.ops.monai_qsa.local_attention(qkv, table, 5, 1, 0.5))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


def test_captured_by_export_and_compile():
    layer = randomised_layer(3, 2, 8, 3, 2, 1, 1)
    x = torch.randn(2, 2, 5, 6, 7)
    with torch.no_grad():
        program = torch.export.export(layer, (x,))
        expected = layer(x)
        compiled = torch.compile(layer)(x)
    targets = [node.target for node in program.graph.nodes]
    assert torch.ops.monai_qsa.local_attention.default in targets
    torch.testing.assert_close(program.module()(x), expected)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-4)


@pytest.fixture
def fresh_kernel_lookup():
    """Forget the kernel found so far, so the next SA inference looks it up (and maybe builds it) again under the
    test's environment; restored afterwards."""
    _kernels.cache_clear()
    yield
    _kernels.cache_clear()


def inference_warnings(layer: StandAloneSelfAttention, x: torch.Tensor) -> list[str]:
    """Run inference twice; check it against the differentiable path; the RuntimeWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = layer(x)
            layer(x)
    torch.testing.assert_close(out, layer(x, return_attention=True)[0].detach(), atol=1e-5, rtol=1e-4)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def compiler_free_path(tmp_path: Path) -> str:
    """A PATH with python but no C compiler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    assert all(shutil.which(name, path=str(bin_dir)) is None for name in ("cc", "gcc", "clang"))
    return str(bin_dir)


@pytest.fixture
def layer_and_input():
    return randomised_layer(2, 3, 8, 5, 2, 1, 1), torch.randn(1, 3, 12, 70)


def test_disabled_by_environment_variable(monkeypatch, fresh_kernel_lookup, layer_and_input):
    monkeypatch.setenv("MONAI_QSA_FUSED_ATTENTION", "0")
    assert inference_warnings(*layer_and_input) == []
    assert not fused_kernel_available()


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", compiler_free_path(tmp_path))
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path / "empty_cache"))
    caught = inference_warnings(*layer_and_input)
    assert len(caught) == 1 and "No C compiler found" in caught[0]
    assert not fused_kernel_available()


def test_compiler_failure_falls_back(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("PATH", compiler_free_path(tmp_path))
    caught = inference_warnings(*layer_and_input)
    assert len(caught) == 1 and "Could not build" in caught[0] and "/bin/false" in caught[0]


def test_cached_kernel_needs_no_compiler(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(cache))
    assert fused_kernel_available()  # built into the new cache
    assert len(list((cache / "kernels").glob("*/*.so"))) == 1
    _kernels.cache_clear()
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", compiler_free_path(tmp_path))
    assert inference_warnings(*layer_and_input) == []
    assert fused_kernel_available()


@pytest.mark.parametrize("dims", [2, 3])
def test_any_memory_layout_of_the_projection(dims):
    # int8 convolutions leave the projection channels-last; views may also interleave heads and channels
    spatial = (9, 70) if dims == 2 else (5, 6, 7)
    heads, d = 2, 4
    projection = torch.randn((2, 3 * heads * d) + spatial)
    table = torch.randn(dims, 5, d)
    expected = local_attention_reference(projection.reshape((2, 3, heads, d) + spatial), table, 5, 1, 0.5)[0]
    channels_last = projection.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    layouts = {
        "contiguous": projection.reshape((2, 3, heads, d) + spatial),
        "channels-last": channels_last.reshape((2, 3, heads, d) + spatial),
        "heads interleaved": projection.reshape((2, 3, d, heads) + spatial).transpose(2, 3),
    }
    for name, qkv in layouts.items():
        if name == "heads interleaved":
            expected = local_attention_reference(qkv, table, 5, 1, 0.5)[0]
        fused = torch.ops.monai_qsa.local_attention(qkv, table, 5, 1, 0.5)
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_damaged_cached_kernel_falls_back(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path))
    library, digest = cache_entry_files(tmp_path)
    library.write_bytes(b"not a shared library")  # with its correct hash: verified, then fails to load
    digest.write_text(hashlib.sha256(library.read_bytes()).hexdigest())
    caught = inference_warnings(*layer_and_input)
    assert len(caught) == 1 and "Could not load" in caught[0] and library.name in caught[0]


def cache_entry_files(cache_root: Path, mode: int = 0o700) -> tuple[Path, Path]:
    """The library and hash files of the fused kernel's cache entry under ``cache_root`` (directories created with
    ``mode``; the files are not)."""
    compiler = find_compiler("CC", ("cc", "gcc", "clang"))
    entry = cache_root / "kernels" / f"local_attention_{_artifact_key(_SOURCE, _FLAGS)}_{_compiler_key(compiler)}"
    for directory in (cache_root, cache_root / "kernels", entry):
        directory.mkdir(exist_ok=True)
        directory.chmod(mode)
    return entry / "local_attention.so", entry / "local_attention.so.sha256"


def plant_library(library: Path, marker: Path) -> None:
    """A real shared library at ``library`` whose constructor writes ``marker`` when it is loaded, and its correct
    SHA-256 beside it (what an attacker with write access to the cache could write)."""
    source = library.parent / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void plant(void) "
        f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
    )
    subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    source.unlink()
    library.with_name(library.name + ".sha256").write_text(hashlib.sha256(library.read_bytes()).hexdigest())


def test_planted_library_in_shared_cache_is_never_loaded(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    library, _ = cache_entry_files(tmp_path / "shared", mode=0o777)
    marker = tmp_path / "constructor_ran"
    plant_library(library, marker)
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path / "shared"))
    caught = inference_warnings(*layer_and_input)
    assert not marker.exists()
    assert len(caught) == 1 and "writable by group or others" in caught[0]
    assert "private temporary directory" in caught[0]
    assert fused_kernel_available()  # built privately


def test_planted_library_without_our_hash_is_never_loaded(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    library, digest = cache_entry_files(tmp_path)
    marker = tmp_path / "constructor_ran"
    plant_library(library, marker)
    digest.write_text("0" * 64)  # e.g. the hash of the library we built, replaced since
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path))
    caught = inference_warnings(*layer_and_input)
    assert not marker.exists()
    assert len(caught) == 1 and "does not match the SHA-256 recorded" in caught[0]
    assert fused_kernel_available()


def test_tampered_hash_or_unsafe_file_is_refused(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path))
    assert fused_kernel_available()
    library, digest = cache_entry_files(tmp_path)
    digest.write_text(digest.read_text()[::-1])
    _kernels.cache_clear()
    caught = inference_warnings(*layer_and_input)
    assert len(caught) == 1 and "does not match the SHA-256 recorded" in caught[0]
    digest.write_text(hashlib.sha256(library.read_bytes()).hexdigest())
    library.chmod(0o766)
    _kernels.cache_clear()
    caught = inference_warnings(*layer_and_input)
    assert len(caught) == 1 and f"{library} is writable by group or others" in caught[0]


def test_cache_is_private_and_keyed_by_flags(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="monai_qsa.networks.blocks.local_attention"):
        assert compiled_library(_SOURCE) is not None
        assert compiled_library(_SOURCE) is not None  # from the cache
        assert compiled_library(_SOURCE, ("-DMONAI_QSA_TEST_FLAG",)) is not None  # a second entry
    builds = [r.message for r in caplog.records if r.message.startswith("Building monai_qsa's")]
    assert builds == ["Building monai_qsa's local_attention kernel (once per machine)..."] * 2
    assert len([r for r in caplog.records if r.message.startswith("Built local_attention.so in")]) == 2
    kernels = kernel_cache_dir()
    assert stat.S_IMODE(kernels.stat().st_mode) == 0o700 and stat.S_IMODE(kernels.parent.stat().st_mode) == 0o700
    assert len(list(kernels.glob("local_attention_*/local_attention.so"))) == 2


# ---- training: the differentiable operator torch.ops.monai_qsa.local_attention_forward and its backward pass ----


@pytest.mark.parametrize(
    "dims,spatial,kernel_size,dilation", [(2, (4, 5), 3, 1), (2, (5, 3), 3, 2), (3, (3, 4, 3), 3, 1)]
)
def test_gradcheck_float64(dims, spatial, kernel_size, dilation):
    # float64 runs the operator's reference dispatch (the C kernel is fp32): checks its autograd registration
    # (its backward is the C kernel's formulas in PyTorch operations)
    qkv = torch.randn((1, 3, 2, 3) + spatial, dtype=torch.float64, requires_grad=True)
    table = torch.randn(dims, kernel_size, 3, dtype=torch.float64, requires_grad=True)

    def attention(qkv, table):
        return local_attention_forward(qkv, table, kernel_size, dilation, 0.6)[0]

    assert torch.autograd.gradcheck(attention, (qkv, table), fast_mode=True)


def reference_gradients(qkv, table, kernel_size, dilation, scale, grad_out):
    """Output and gradients of the PyTorch reference, in float64."""
    inputs = (qkv.double().requires_grad_(), table.double().requires_grad_())
    out = local_attention_reference(*inputs, kernel_size, dilation, scale)[0]
    return (out, *torch.autograd.grad(out, inputs, grad_out.double()))


@pytest.mark.parametrize(
    "dims,heads,d,spatial,kernel_size,dilation",
    [
        (2, 3, 4, (9, 70), 5, 1),  # rows longer than the kernel's 64-position block
        (2, 2, 8, (13, 67), 5, 2),  # dilation, odd sizes
        (2, 1, 2, (3, 4), 7, 1),  # neighbourhood larger than the image
        (3, 2, 4, (5, 6, 9), 3, 1),
        (3, 2, 6, (6, 8, 7), 5, 2),
    ],
)
def test_fused_gradients_equal_reference(dims, heads, d, spatial, kernel_size, dilation):
    qkv = torch.randn((2, 3, heads, d) + spatial, requires_grad=True)
    table = torch.randn(dims, kernel_size, d, requires_grad=True)
    out, lse = local_attention_forward(qkv, table, kernel_size, dilation, d**-0.5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qkv, table), grad_out)
    expected = reference_gradients(qkv, table, kernel_size, dilation, d**-0.5, grad_out)
    # fp32 kernel against the float64 reference: tolerances of fp32 sums over k^d neighbours and d channels
    for name, actual, wanted in zip(("out", "grad_qkv", "grad_table"), (out, *grads), expected):
        torch.testing.assert_close(actual, wanted.float(), atol=2e-5 * wanted.abs().max().item(), rtol=1e-4, msg=name)
    assert lse.shape == (2, heads) + spatial and not lse.requires_grad


class OperatorRecorder(TorchDispatchMode):
    """Records the operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.operators = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators.add(func)
        return func(*args, **(kwargs or {}))


def test_layer_training_runs_the_fused_operators():
    layer = randomised_layer(2, 3, 12, 5, 3, 2, 1).train()  # stride 2 (pooling after the attention), 3 heads
    x = torch.randn(2, 3, 11, 13, requires_grad=True)
    parameters = (x, *layer.parameters())
    with OperatorRecorder() as recorder:
        fused = layer(x)
        grad = torch.randn_like(fused)
        fused_grads = torch.autograd.grad(fused, parameters, grad)
    ops = torch.ops.monai_qsa
    assert {ops.local_attention_forward.default, ops.local_attention_backward.default} <= recorder.operators
    reference = layer(x, return_attention=True)[0]  # the PyTorch path
    for a, b in zip(fused_grads, torch.autograd.grad(reference, parameters, grad)):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


def test_backward_thread_count_does_not_change_the_result():
    # every gradient element is computed by one thread in a fixed order: bitwise equal for any thread count
    qkv, table = torch.randn(2, 3, 2, 4, 17, 130, requires_grad=True), torch.randn(2, 5, 4, requires_grad=True)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert _thread_count(qkv.shape, 5) == threads  # large enough for the kernel to use both threads
            out = local_attention_forward(qkv, table, 5, 1, 0.5)[0]
            results.append(torch.autograd.grad(out, (qkv, table), torch.ones_like(out)))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, atol=0, rtol=0)


def test_training_operator_passes_opcheck():
    # schema, fake implementations (torch.compile / torch.export) and the autograd registration
    qkv = torch.randn(1, 3, 2, 4, 5, 6, requires_grad=True)
    table = torch.randn(2, 3, 4, requires_grad=True)
    torch.library.opcheck(local_attention_forward, (qkv, table, 3, 1, 0.5))


def saunet_training_step(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one SAUNet training step (fixed weights and batch)."""
    torch.manual_seed(seed)
    net = SAUNet(2, 1, 2, features=(8, 16, 32), kernel_size=5, num_heads=2).train()
    x, labels = torch.randn(2, 1, 24, 20), torch.randint(0, 2, (2, 1, 24, 20))
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(net(x), labels)
    loss.backward()
    return loss.detach(), [p.grad for p in net.parameters()]


def test_saunet_training_step_same_with_and_without_fused_kernel(monkeypatch, fresh_kernel_lookup):
    assert fused_kernel_available()
    fused_loss, fused_grads = saunet_training_step(0)
    monkeypatch.setenv("MONAI_QSA_FUSED_ATTENTION", "0")
    _kernels.cache_clear()
    reference_loss, reference_grads = saunet_training_step(0)
    assert not fused_kernel_available()
    torch.testing.assert_close(fused_loss, reference_loss, atol=1e-6, rtol=1e-5)
    for fused, reference in zip(fused_grads, reference_grads):
        torch.testing.assert_close(fused, reference, atol=1e-5 * reference.abs().max().item() + 1e-7, rtol=1e-3)


def test_flop_counter_sees_the_training_operators():
    # the attention's MACs per channel and position: forward 2 k^d + k, backward 5 k^d + 2 k (recomputed logits)
    qkv, table = torch.randn(2, 3, 2, 4, 6, 7, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        local_attention_forward(qkv, table, 3, 1, 0.5)[0].sum().backward()
    per_channel_and_position = 2 * 6 * 7 * 2 * 4
    flops = counter.get_flop_counts()["Global"]
    assert flops[torch.ops.monai_qsa.local_attention_forward] == 2 * per_channel_and_position * (2 * 9 + 3)
    assert flops[torch.ops.monai_qsa.local_attention_backward] == 2 * per_channel_and_position * (5 * 9 + 2 * 3)


# ---- argument checks: the operators are called by graphs a model file describes; the C kernels trust the shapes ----


def _valid_problem(dims: int = 2) -> tuple:
    """A matching (qkv, table, kernel_size, dilation, scale): 2 heads of 4 channels, kernel size 3."""
    return torch.randn((1, 3, 2, 4) + (6, 7, 5)[:dims]), torch.randn(dims, 3, 4), 3, 1, 0.5


MISMATCHED_FORWARD_ARGUMENTS = [
    # (what changes, how, message): each changes one argument of _valid_problem()
    ("table for kernel size 3 with kernel_size 31", lambda a: (a[0], a[1], 31, 1, 0.5), "table must have shape"),
    ("qkv.shape[1] == 1", lambda a: (a[0][:, :1], *a[1:]), "qkv must be a floating-point tensor"),
    ("qkv with 1 spatial dimension", lambda a: (a[0][..., 0], *a[1:]), "qkv must be"),
    ("qkv with 4 spatial dimensions", lambda a: (a[0].unsqueeze(-1).unsqueeze(-1), *a[1:]), "qkv must be"),
    ("3D table for 2D images", lambda a: (a[0], torch.randn(3, 3, 4), *a[2:]), "table must have shape"),
    (
        "table of another d_head",
        lambda a: (a[0], torch.randn(2, 3, 8), *a[2:]),
        r"table must have shape .* = \(2, 3, 4\)",
    ),
    ("even kernel_size", lambda a: (a[0], torch.randn(2, 4, 4), 4, 1, 0.5), "kernel_size must be odd"),
    ("kernel_size 0", lambda a: (a[0], torch.randn(2, 0, 4), 0, 1, 0.5), "kernel_size must be odd"),
    ("kernel_size -1", lambda a: (a[0], a[1], -1, 1, 0.5), "kernel_size must be odd"),
    ("kernel_size past a C int", lambda a: (a[0], a[1], 2**32 + 3, 1, 0.5), "between 1 and 255"),
    ("dilation 0", lambda a: (*a[:3], 0, 0.5), "dilation must be between 1"),
    ("dilation past a C int", lambda a: (*a[:3], 2**32 + 1, 0.5), "dilation must be between 1"),
    ("nan scale", lambda a: (*a[:4], float("nan")), "scale must be a finite number"),
    ("infinite scale", lambda a: (*a[:4], float("-inf")), "scale must be a finite number"),
    ("float64 table", lambda a: (a[0], a[1].double(), *a[2:]), "share one dtype and device"),
    ("integer tensors", lambda a: (a[0].to(torch.int32), a[1].to(torch.int32), *a[2:]), "floating-point"),
]


@pytest.fixture
def kernels_must_not_run(monkeypatch):
    """Make any use of the C kernels fail the test: argument checks come first."""
    import monai_qsa.networks.blocks.local_attention as module

    def kernels():
        raise AssertionError("the C kernels were reached with mismatched arguments")

    monkeypatch.setattr(module, "_kernels", kernels)


@pytest.mark.parametrize("operator", ["local_attention", "local_attention_forward"])
@pytest.mark.parametrize(
    "change, message",
    [case[1:] for case in MISMATCHED_FORWARD_ARGUMENTS],
    ids=[c[0] for c in MISMATCHED_FORWARD_ARGUMENTS],
)
def test_mismatched_arguments_are_a_value_error(operator, change, message, kernels_must_not_run):
    with pytest.raises(ValueError, match=message) as error:
        getattr(torch.ops.monai_qsa, operator)(*change(_valid_problem()))
    assert f"monai_qsa.{operator}:" in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g, o, lse: (g[..., :-1], o, lse), "grad_out must have shape"),
        (lambda g, o, lse: (g, o[:, :1], lse), "out must have shape"),
        (lambda g, o, lse: (g, o, lse.unsqueeze(2)), "lse must have shape"),
        (lambda g, o, lse: (g, o, lse[:, :, :1]), "lse must have shape"),
        (lambda g, o, lse: (g.double(), o, lse), "grad_out is torch.float64"),
        (lambda g, o, lse: (g, o, lse.to_sparse()), "lse must be a dense"),
    ],
    ids=["grad-width", "out-heads", "lse-dims", "lse-height", "grad-dtype", "sparse-lse"],
)
def test_backward_with_mismatched_saved_tensors_is_a_value_error(change, message):
    qkv, table, kernel_size, dilation, scale = _valid_problem()
    out, lse = local_attention_forward(qkv, table, kernel_size, dilation, scale)
    grad_out, out, lse = change(torch.randn_like(out), out, lse)
    with pytest.raises(ValueError, match=message):
        torch.ops.monai_qsa.local_attention_backward(grad_out, qkv, table, out, lse, kernel_size, dilation, scale)


@pytest.mark.parametrize("dims", [2, 3])
def test_backward_with_mismatched_forward_arguments_is_a_value_error(dims, kernels_must_not_run):
    qkv, table, _, dilation, scale = _valid_problem(dims)
    grad_out = out = torch.randn(qkv.shape[:1] + qkv.shape[2:])
    lse = torch.randn(qkv.shape[:1] + qkv.shape[2:3] + qkv.shape[4:])
    with pytest.raises(ValueError, match="table must have shape"):
        torch.ops.monai_qsa.local_attention_backward(grad_out, qkv, table, out, lse, 31, dilation, scale)
    with pytest.raises(ValueError, match="qkv must be"):
        torch.ops.monai_qsa.local_attention_backward(grad_out, qkv[:, :2], table, out, lse, 3, dilation, scale)


@pytest.mark.parametrize("dims", [2, 3])
def test_matching_arguments_pass_the_checks(dims):
    problem = _valid_problem(dims)
    expected = local_attention_reference(*problem)[0]
    torch.testing.assert_close(torch.ops.monai_qsa.local_attention(*problem), expected)
    torch.testing.assert_close(local_attention_forward(*problem)[0], expected)

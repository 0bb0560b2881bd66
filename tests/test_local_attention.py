"""The fused attention kernel (``torch.ops.monai_qsa.local_attention``): same function as the differentiable
reference, its fall-backs, and its capture by torch.export / torch.compile."""

import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from monai_qsa.networks.blocks import StandAloneSelfAttention
from monai_qsa.networks.blocks.local_attention import _kernels, fused_kernel_available, local_attention_reference

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
    assert any((Path(os.environ["MONAI_QSA_CACHE_DIR"]) / "kernels").glob("*.so"))


@pytest.mark.parametrize("dims,cin,cout,ksize,heads,stride,dil,spatial", CASES)
def test_fused_inference_equals_differentiable_path(dims, cin, cout, ksize, heads, stride, dil, spatial):
    layer = randomised_layer(dims, cin, cout, ksize, heads, stride, dil)
    x = torch.randn((2, cin) + spatial)
    reference = layer(x)  # gradients enabled: the PyTorch reference (test_sasa checks it against brute force)
    assert reference.requires_grad
    with torch.no_grad():
        fused = layer(x)
    torch.testing.assert_close(fused, reference.detach(), atol=2e-5, rtol=1e-4)
    # logits in the thousands (peaked softmax, exp underflow): finite, and equal up to fp32 conditioning
    with torch.no_grad():
        scaled = layer(100 * x)
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled, layer(100 * x).detach(), atol=5e-2, rtol=1e-2)


def test_thread_count_does_not_change_the_result():
    # every output position is computed by one thread in a fixed order: bitwise equal for any thread count
    qkv, table = torch.randn(3, 3, 2, 4, 17, 90), torch.randn(2, 5, 4)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
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
    torch.testing.assert_close(out, layer(x).detach(), atol=1e-5, rtol=1e-4)
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
    assert len(list((cache / "kernels").glob("*.so"))) == 1
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
            expected_here = local_attention_reference(qkv, table, 5, 1, 0.5)[0]
        else:
            expected_here = expected
        torch.testing.assert_close(torch.ops.monai_qsa.local_attention(qkv, table, 5, 1, 0.5), expected_here, atol=1e-5, rtol=1e-4, msg=name)


def test_damaged_cached_kernel_falls_back(monkeypatch, tmp_path, fresh_kernel_lookup, layer_and_input):
    built = tmp_path / "built"
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(built))
    assert fused_kernel_available()
    # a damaged file under the kernel's cache name, in a cache this process has not loaded from
    damaged = tmp_path / "damaged" / "kernels" / next((built / "kernels").glob("*.so")).name
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path / "damaged"))
    _kernels.cache_clear()
    caught = inference_warnings(*layer_and_input)
    assert len(caught) == 1 and "Could not load" in caught[0] and damaged.name in caught[0]

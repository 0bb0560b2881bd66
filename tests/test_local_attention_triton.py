"""The Triton (CUDA) kernels of the neighbourhood attention: same function as ``local_attention_reference``.

Without a GPU they run through Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, numpy), and Triton's
compiler builds them for an H100/H200 (sm_90) without running them; the CUDA tests run the real kernels and skip,
saying so, where no CUDA device is present (``scripts/gpu_check.sh`` runs them on a GPU machine).
"""

import os
import subprocess
import sys

import pytest
import torch

import monai_qsa.networks.blocks.local_attention_triton as triton_module
from monai_qsa.networks.blocks import StandAloneSelfAttention
from monai_qsa.networks.blocks.local_attention import _fused_kernels, _reference_attention
from monai_qsa.networks.blocks.local_attention_triton import (
    _compiled,
    _launch_parameters,
    triton_available,
    triton_backward,
    triton_forward,
    triton_supports,
)

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the Triton kernels' GPU runs need one (scripts/gpu_check.sh runs them on a GPU)",
)

# dims, kernel, dilation, heads, d_head, spatial, dtype: borders on every side (images barely larger than the
# neighbourhood), odd sizes, a non-power-of-two head width, dilation 2 in 2D and 3D, fp16 and bf16 inputs
CASES = [
    (2, 3, 1, 2, 4, (5, 7), torch.float32),
    (2, 5, 2, 2, 3, (9, 11), torch.float32),
    (3, 3, 2, 2, 4, (5, 4, 5), torch.float32),
    (3, 5, 1, 1, 6, (3, 4, 5), torch.float32),
    (2, 5, 2, 2, 4, (9, 11), torch.bfloat16),
    (3, 3, 1, 2, 4, (3, 4, 5), torch.float16),
]
# fp32: rounding only. Half precision: inputs rounded to the dtype, every sum in fp32, outputs rounded; compared with
# the fp32 reference on the same rounded inputs, a few units in the dtype's last place at the values' size (1-7).
TOLERANCE = {
    torch.float32: dict(atol=5e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
}

# Triton's interpreter must be chosen before Triton is first imported (torch.utils.flop_counter imports it), so the
# kernels run in a child process that loads only torch and the kernels' module (by path, not the monai_qsa package)
INTERPRETED = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("local_attention_triton", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
results = []
for case in torch.load(sys.argv[2]):
    out, lse = module.triton_forward(case["qkv"], case["table"], *case["args"], save_lse=case["save_lse"])
    grads = None if lse is None else module.triton_backward(case["grad_out"], case["qkv"], case["table"], out, lse,
                                                            *case["args"])
    results.append({"out": out, "lse": lse, "grads": grads})
torch.save(results, sys.argv[3])
"""


def attention_inputs(dims, kernel, heads, d, spatial, dtype=torch.float32, batch=2):
    qkv = torch.randn((batch, 3, heads, d) + spatial).to(dtype)
    table = torch.randn(dims, kernel, d).to(dtype)  # unit-scale embeddings: the relative term matters
    return qkv, table


def channels_last_case() -> dict:
    """A projection as a 1x1 convolution may leave it: channels-last (int8 convolutions), not contiguous."""
    projection = torch.randn(2, 3 * 2 * 4, 6, 9).contiguous(memory_format=torch.channels_last)
    qkv = projection.reshape(2, 3, 2, 4, 6, 9)
    assert not qkv.is_contiguous()
    return {"qkv": qkv, "table": torch.randn(2, 3, 4), "args": (3, 1, 0.5), "save_lse": False, "grad_out": None}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case of ``CASES`` (forward and backward) and ``channels_last_case`` (inference) through Triton's
    interpreter, in one child process: ``(cases, results)``."""
    torch.manual_seed(0)
    cases = []
    for dims, kernel, dilation, heads, d, spatial, dtype in CASES:
        qkv, table = attention_inputs(dims, kernel, heads, d, spatial, dtype)
        grad_out = torch.randn((2, heads, d) + spatial).to(dtype)
        cases.append({"qkv": qkv, "table": table, "args": (kernel, dilation, d**-0.5), "save_lse": True,
                      "grad_out": grad_out})  # fmt: skip
    cases.append(channels_last_case())
    folder = tmp_path_factory.mktemp("interpreted")
    torch.save(cases, folder / "cases.pt")
    command = [sys.executable, "-c", INTERPRETED, triton_module.__file__, folder / "cases.pt", folder / "results.pt"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return cases, torch.load(folder / "results.pt")


def reference_with_grads(case: dict):
    """fp32 reference output, log-sum-exp and gradients (autograd through ``local_attention_reference``'s graph)."""
    qkv = case["qkv"].float().requires_grad_()
    table = case["table"].float().requires_grad_()
    out, _, logits = _reference_attention(qkv, table, *case["args"])
    grad_qkv, grad_table = torch.autograd.grad(out, (qkv, table), case["grad_out"].float())
    return out.detach(), logits.logsumexp(2).detach(), grad_qkv, grad_table


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}d-k{c[1]}-dil{c[2]}-{c[6]}" for c in CASES])
def test_interpreted_kernels_match_reference(interpreted, index):
    cases, results = interpreted
    case, result = cases[index], results[index]
    dtype = case["qkv"].dtype
    grad_qkv, grad_table = result["grads"]
    assert result["out"].dtype == result["lse"].dtype == grad_qkv.dtype == grad_table.dtype == dtype
    assert grad_qkv.shape == case["qkv"].shape and grad_qkv.is_contiguous()
    actual = (result["out"], result["lse"], grad_qkv, grad_table)
    for name, value, expected in zip(("out", "lse", "grad_qkv", "grad_table"), actual, reference_with_grads(case)):
        torch.testing.assert_close(value.float(), expected, **TOLERANCE[dtype], msg=name)


def test_interpreted_any_layout_without_lse(interpreted):
    cases, results = interpreted
    case, result = cases[-1], results[-1]
    assert result["lse"] is None
    expected = _reference_attention(case["qkv"], case["table"], *case["args"])[0]
    torch.testing.assert_close(result["out"], expected, **TOLERANCE[torch.float32])


def kernel_signature(kernel, dtype: str, constants: dict) -> dict[str, str]:
    """Triton's signature of one of our kernels: pointers (fp32 for the table and scratch buffers, else the inputs'
    dtype), ``scale``s fp32, other arguments int32, ``constants`` compile-time."""
    fp32_buffers = {"rel", "lse2_buf", "delta_buf", "grad_rel_part"}
    pointers = kernel.arg_names[: kernel.arg_names.index("heads")]
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*fp32" if name in fp32_buffers else f"*{dtype}"
        else:
            signature[name] = "fp32" if name.endswith("scale") else "i32"
    return signature


@pytest.mark.parametrize("dims,kernel,dtype", [(2, 7, "fp32"), (3, 5, "bf16")])
def test_kernels_compile_for_hopper(dims, kernel, dtype):
    """Triton's compiler (not the interpreter) builds every kernel to sm_90 machine code, no GPU needed: catches what
    the interpreter lets through (loop-carried types, unsupported operations)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spatial = (20, 30) if dims == 2 else (6, 7, 8)
    launch = _launch_parameters(torch.empty((2, 3, 8, 8) + spatial), kernel, 1)
    kernels = _compiled()
    variants = [
        (kernels.forward, dict(SAVE_LSE=True)),
        (kernels.backward_query, dict(RECOMPUTE_LSE=dtype != "fp32")),
        (kernels.backward_key, {}),
    ]
    for jit_kernel, flags in variants:
        constants = {**launch.constants, **flags}
        source = ASTSource(jit_kernel, kernel_signature(jit_kernel, dtype, constants), constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch.num_warps})
        assert compiled.asm["cubin"], jit_kernel.__name__


def test_dispatch_without_triton_or_cuda(monkeypatch):
    qkv, table = attention_inputs(2, 3, 2, 4, (5, 6))
    assert not triton_supports(qkv, table)  # CPU tensors: the C kernel or the reference
    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    triton_available.cache_clear()
    try:
        assert not triton_available()
        assert _fused_kernels(qkv, table) is not None  # the C kernels do not need Triton
    finally:
        triton_available.cache_clear()


@pytest.fixture
def exact_convolutions(monkeypatch):
    """fp32 convolutions without TF32 (cuDNN's default on Ampere and later), so that fp32 tolerances hold for the
    layer's projection and its gradients."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def randomised_layer(dims, kernel, dilation, device, dtype=torch.float32):
    layer = StandAloneSelfAttention(dims, 8, 16, kernel, num_heads=2, dilation=dilation, qkv_bias=True)
    with torch.no_grad():
        for embedding in layer.rel_pos:
            embedding.normal_()
    return layer.to(device=device, dtype=dtype)


@CUDA
def test_cuda_dispatches_to_triton():
    qkv, table = attention_inputs(2, 3, 2, 4, (5, 6))
    assert triton_available(), "CUDA torch builds ship Triton"
    forward, backward = _fused_kernels(qkv.cuda(), table.cuda())
    assert forward.func is triton_forward and backward is triton_backward


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str) -> None:
    """``|actual - expected| / |expected| <= tolerance`` in the Euclidean norm (gradients of any magnitude)."""
    error = ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def output_and_grads(module, x: torch.Tensor, grad_out: torch.Tensor, inputs: tuple) -> tuple:
    """The module's output and the gradients of ``inputs`` for the output gradient ``grad_out``."""
    out = module(x)
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


@CUDA
@pytest.mark.parametrize(
    "dims,kernel,dilation,spatial", [(2, 7, 1, (64, 67)), (2, 5, 2, (33, 40)), (3, 5, 1, (12, 13, 14))]
)
def test_cuda_layer_matches_reference(exact_convolutions, dims, kernel, dilation, spatial):
    layer = randomised_layer(dims, kernel, dilation, "cuda")
    x = torch.randn((3, 8) + spatial, device="cuda", requires_grad=True)
    grad_out = torch.randn((3, 16) + spatial, device="cuda")
    inputs = (x, *layer.parameters())
    fused, fused_grads = output_and_grads(layer, x, grad_out, inputs)  # training operator: Triton forward, backward
    reference, reference_grads = output_and_grads(lambda t: layer(t, return_attention=True)[0], x, grad_out, inputs)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)
    for index, (actual, expected) in enumerate(zip(fused_grads, reference_grads)):
        assert_relative(actual, expected, 1e-4, f"gradient {index}")
    with torch.no_grad():  # inference operator
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-4)


# relative error in norm of half-precision layers against the fp32 layer with the same (rounded) weights and input:
# a few units in the dtype's last place (bf16 2^-8, fp16 2^-11)
HALF_RELATIVE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision(dtype):
    layer = randomised_layer(2, 5, 1, "cuda", dtype)
    x = torch.randn(2, 8, 40, 45, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 16, 40, 45, device="cuda")
    fused, (grad_x,) = output_and_grads(layer, x, grad_out, (x,))
    reference_layer = randomised_layer(2, 5, 1, "cuda")
    reference_layer.load_state_dict({name: value.float() for name, value in layer.state_dict().items()})
    x32 = x.detach().float().requires_grad_()
    reference, (reference_grad,) = output_and_grads(
        lambda t: reference_layer(t, return_attention=True)[0], x32, grad_out, (x32,)
    )
    assert fused.dtype == grad_x.dtype == dtype
    assert_relative(fused, reference, HALF_RELATIVE[dtype], "output")
    assert_relative(grad_x, reference_grad, HALF_RELATIVE[dtype], "input gradient")


@CUDA
def test_cuda_compiled_training_step(exact_convolutions):
    layer = randomised_layer(3, 3, 1, "cuda")
    x = torch.randn(2, 8, 10, 11, 12, device="cuda")
    grad_out = torch.randn(2, 16, 10, 11, 12, device="cuda")
    eager_out, eager_grads = output_and_grads(layer, x, grad_out, tuple(layer.parameters()))
    compiled_out, compiled_grads = output_and_grads(torch.compile(layer), x, grad_out, tuple(layer.parameters()))
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-4)
    for index, (actual, expected) in enumerate(zip(compiled_grads, eager_grads)):
        assert_relative(actual, expected, 1e-4, f"gradient {index}")

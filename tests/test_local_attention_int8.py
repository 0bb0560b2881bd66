"""The int8 attention operator (``torch.ops.monai_qsa.local_attention_int8``): every instruction-set path against
the PyTorch int8 function and the fp32 attention, exact agreement of the C paths, layouts, export, fall-back."""

import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.flop_counter

from monai_qsa.networks.blocks.local_attention import CFLAGS_VARIABLE, local_attention_reference
from monai_qsa.networks.blocks.local_attention_int8 import (
    INT8_ATTENTION_PATHS,
    PATH_VARIABLE,
    _library,
    int8_attention_paths,
    local_attention_int8_reference,
    project_in_order,
    projected_local_attention_int8_reference,
    symmetric_scale,
)
from monai_qsa.quantization.int8_attention import quantize_attention_int8

# dims, heads, d_head, kernel, dilation, spatial: rows longer than the kernel's 64-position block, odd sizes,
# rows of 32..63 positions, d_head not a multiple of 4 (zero-filled channel groups), dilation, borders everywhere,
# d_head 16 and 32
CASES = [
    (2, 3, 6, 7, 1, (9, 70)),
    (2, 2, 5, 5, 2, (13, 67)),
    (2, 1, 8, 3, 1, (4, 3)),
    (3, 2, 8, 3, 2, (5, 6, 9)),
    (3, 1, 4, 5, 1, (3, 4, 41)),
    (2, 2, 16, 7, 1, (5, 40)),  # d_head 4, 8, 16, 32: the kernel's specialisations, queries in registers
    (3, 1, 16, 3, 1, (4, 5, 19)),
    (2, 1, 32, 3, 1, (4, 21)),
]
C_PATHS = ["avx512_vnni", "avx_vnni", "avx2", "scalar"]


def attention_problem(dims, heads, d_head, kernel_size, dilation, spatial):
    """A projection, relative-position table, logit scale and the q/k/v int8 scales of their value ranges."""
    qkv = torch.randn((2, 3, heads, d_head) + spatial)
    table = 0.5 * torch.randn(dims, kernel_size, d_head)
    scales = [symmetric_scale(qkv[:, part].abs().max()) for part in range(3)]
    return qkv, table, kernel_size, dilation, d_head**-0.5, *scales


def run(path: str, monkeypatch, problem) -> torch.Tensor:
    monkeypatch.setenv(PATH_VARIABLE, path)
    return torch.ops.monai_qsa.local_attention_int8(*problem)


@pytest.fixture
def fresh_library():
    """Forget the kernel found so far, so that the next call looks it up under the test's environment."""
    _library.cache_clear()
    yield
    _library.cache_clear()


def test_paths_dispatched_by_the_cpu():
    """The test machine has gcc: the scalar path always runs, the SIMD paths exactly where the CPU has their
    instructions."""
    paths = int8_attention_paths()
    assert paths[-2:] == ["scalar", "torch"]
    flags = set(
        next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    )
    assert ("avx2" in paths) == ({"avx2", "fma"} <= flags)
    assert ("avx_vnni" in paths) == ({"avx_vnni", "fma"} <= flags)
    assert ("avx512_vnni" in paths) == ({"avx512_vnni", "avx512bw", "avx512vl"} <= flags)


@pytest.mark.parametrize("path", C_PATHS)
def test_unsupported_path_is_refused_else_runs(path, monkeypatch):
    """A path this CPU lacks is a clear error naming the variable; one it has runs."""
    problem = attention_problem(*CASES[0])
    if path in int8_attention_paths():
        assert run(path, monkeypatch, problem).shape == (2, 3, 6, 9, 70)
    else:
        with pytest.raises(ValueError, match=PATH_VARIABLE):
            run(path, monkeypatch, problem)


@pytest.mark.parametrize("case", CASES)
def test_c_paths_agree_exactly_and_match_the_pytorch_function(case, monkeypatch):
    """Integer sums are exact, so all C paths give identical outputs. Against the PyTorch function they differ only
    where the kernel's exp (relative error < 1.2e-4) rounds a uint8 weight the other way: far below one int8 step of
    the values (v_scale)."""
    problem = attention_problem(*case)
    v_scale = problem[-1]
    outputs = {path: run(path, monkeypatch, problem) for path in int8_attention_paths()}
    native = [path for path in outputs if path != "torch"]
    for path in native[1:]:
        assert torch.equal(outputs[path], outputs[native[0]]), f"{path} differs from {native[0]}"
    difference = (outputs[native[0]] - outputs["torch"]).abs()
    assert difference.max() < v_scale
    assert difference.mean() < 0.02 * v_scale


@pytest.mark.parametrize("path", ["auto", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_close_to_fp32_attention(case, path, monkeypatch):
    """Error against the fp32 attention within a few int8 steps of the values (v_scale = max|v| / 127): the
    quantisation error of q, k (through the softmax), v and of the uint8 weights."""
    problem = attention_problem(*case)
    v_scale = problem[-1]
    error = (run(path, monkeypatch, problem) - local_attention_reference(*problem[:5])[0]).abs()
    assert error.max() < 4 * v_scale
    assert error.mean() < 0.4 * v_scale


def test_int8_changes_the_output():
    """The int8 function is not the fp32 one in disguise: coarse scales change the output a lot."""
    qkv, table, kernel_size, dilation, scale, q_scale, k_scale, v_scale = attention_problem(*CASES[0])
    fine = local_attention_int8_reference(qkv, table, kernel_size, dilation, scale, q_scale, k_scale, v_scale)
    coarse = local_attention_int8_reference(qkv, table, kernel_size, dilation, scale, 20 * q_scale, k_scale, v_scale)
    assert (fine - coarse).abs().max() > 10 * v_scale


@pytest.mark.parametrize("dims", [2, 3])
def test_any_memory_layout_of_the_projection(dims, monkeypatch):
    """Channels-last projections (as int8 convolutions leave them) and other strides give the same output as
    contiguous ones."""
    problem = attention_problem(*next(case for case in CASES if case[0] == dims))
    qkv = problem[0]
    channels_last = qkv.flatten(1, 3).contiguous(
        memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d
    )
    channels_last = channels_last.unflatten(1, qkv.shape[1:4])
    assert not channels_last.is_contiguous()
    expected = run("auto", monkeypatch, problem)
    assert torch.equal(run("auto", monkeypatch, (channels_last, *problem[1:])), expected)
    strided = torch.zeros(qkv.shape[:-1] + (2 * qkv.shape[-1],))[..., ::2]  # positions 2 apart: the generic path
    strided.copy_(qkv)
    assert torch.equal(run("auto", monkeypatch, (strided, *problem[1:])), expected)


def test_thread_count_does_not_change_the_result(monkeypatch):
    problem = attention_problem(*CASES[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run("auto", monkeypatch, problem)
        torch.set_num_threads(2)
        assert torch.equal(run("auto", monkeypatch, problem), single)
    finally:
        torch.set_num_threads(threads)


def test_calls_from_several_threads_at_once_keep_their_buffers_apart():
    """The kernel keeps its byte buffers between calls (one block, handed over atomically): calls running at the same
    time, of different sizes, each get buffers of their own and the outputs of calls made one at a time."""
    problems = [attention_problem(*CASES[index]) for index in (0, 1, 2, 3)]
    expected = [torch.ops.monai_qsa.local_attention_int8(*problem) for problem in problems]
    outputs: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(problems))}

    def call(index: int) -> None:
        for _ in range(20):
            outputs[index].append(torch.ops.monai_qsa.local_attention_int8(*problems[index]))

    workers = [threading.Thread(target=call, args=(index,)) for index in range(len(problems))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for index, results in outputs.items():
        assert len(results) == 20
        assert all(torch.equal(result, expected[index]) for result in results), index


class Attention(torch.nn.Module):
    def forward(self, qkv: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return torch.ops.monai_qsa.local_attention_int8(qkv, table, 3, 1, 0.5, 0.02, 0.03, 0.04)


class Fp32Attention(torch.nn.Module):
    def forward(self, qkv: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return torch.ops.monai_qsa.local_attention(qkv, table, 3, 1, 0.5)


def test_flop_counter_sees_the_operator():
    """As many operations as the fp32 operator (the count the SASA paper uses), so count_flops is unchanged."""
    qkv, table = torch.randn(1, 3, 2, 4, 8, 9), torch.randn(2, 3, 4)
    counts = []
    for module in (Attention(), Fp32Attention()):
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            module(qkv, table)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 72 * 4 * (2 * 9 + 3)


def test_exported_as_one_node():
    qkv, table = torch.randn(1, 3, 2, 4, 8, 9), torch.randn(2, 3, 4)
    program = torch.export.export(Attention(), (qkv, table))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets == ["monai_qsa.local_attention_int8.default"]
    torch.testing.assert_close(program.module()(qkv, table), Attention()(qkv, table))


def test_operators_trace_by_shape_and_keep_the_input_layout():
    """Tracing (export, compile) runs each operator's fake implementation: the output shape without the kernel; and
    Inductor passes inputs in the layout they have (the ``flexible_layout`` tag: no copy of channels-last inputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.monai_qsa
    with FakeTensorMode():
        x, weight, bias, table = torch.empty(2, 8, 6, 5), torch.empty(48, 8), torch.empty(48), torch.empty(2, 3, 8)
        projected = ops.projected_local_attention_int8(x, weight, bias, table, 3, 1, 0.35, 0.1, 0.1, 0.1)
        attended = ops.local_attention_int8(torch.empty(2, 3, 2, 8, 6, 5), table, 3, 1, 0.35, 0.1, 0.1, 0.1)
    assert projected.shape == attended.shape == (2, 2, 8, 6, 5)
    for op in (ops.local_attention_int8.default, ops.projected_local_attention_int8.default):
        assert torch.Tag.flexible_layout in op.tags


@pytest.mark.parametrize("argument", ["q_scale", "k_scale", "v_scale"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_scale_is_a_clear_error(argument, value):
    scales = {"q_scale": 0.1, "k_scale": 0.1, "v_scale": 0.1, argument: value}
    with pytest.raises(ValueError, match=argument):
        torch.ops.monai_qsa.local_attention_int8(
            torch.randn(1, 3, 1, 4, 5, 5), torch.randn(2, 3, 4), 3, 1, 0.5, *scales.values()
        )


@pytest.mark.parametrize("path", ["auto", "scalar", "torch"])
def test_table_that_is_not_finite_is_a_clear_error(path, monkeypatch):
    """The C kernel quantises the table itself (its own scale, as the PyTorch function does): a NaN or infinity there,
    which a model file can hold, is refused by every path."""
    qkv, table, *arguments = attention_problem(*CASES[2])
    table[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        run(path, monkeypatch, (qkv, table, *arguments))


def test_unknown_path_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=f"{PATH_VARIABLE}='avx9'"):
        run("avx9", monkeypatch, attention_problem(*CASES[2]))
    assert set(C_PATHS) | {"auto", "torch"} == set(INT8_ATTENTION_PATHS)


def test_no_compiler_falls_back_to_pytorch_with_one_warning(monkeypatch, tmp_path, fresh_library):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    assert all(shutil.which(name, path=str(bin_dir)) is None for name in ("cc", "gcc", "clang"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(tmp_path / "empty_cache"))
    problem = attention_problem(*CASES[2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = run("auto", monkeypatch, problem), run("auto", monkeypatch, problem)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "No C compiler found" in messages[0]
    assert int8_attention_paths() == ["torch"]
    assert torch.equal(first, local_attention_int8_reference(*problem)) and torch.equal(first, second)


def test_quantize_attention_int8_swaps_the_nodes_of_an_int8_saunet(tmp_path):
    """PT2E int8 SAUNet -> every attention node int8 with calibrated scales; close to the fp32-attention program;
    saved and loaded as one node per layer."""
    from monai_qsa.networks import SAUNet
    from monai_qsa.quantization import load_quantized, quantize_ptq, save_quantized

    net = SAUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 16), kernel_size=3, num_heads=2).eval()
    calibration, x = [torch.randn(1, 1, 16, 16) for _ in range(2)], torch.randn(1, 1, 16, 16)
    qmodel = quantize_ptq(net, calibration, x, int8_attention=False)  # quantize_ptq swaps them itself by default
    with torch.no_grad():
        fp32_attention = qmodel(x)
        assert quantize_attention_int8(qmodel.program, calibration) == 6  # 3 SA blocks x 2 layers
        int8_attention = qmodel(x)
    targets = [str(node.target) for node in qmodel.program.graph.nodes if "attention" in str(node.target)]
    assert targets == ["monai_qsa.local_attention_int8.default"] * 6
    assert not any("observer" in name for name, _ in qmodel.program.named_modules())
    assert not torch.equal(int8_attention, fp32_attention)
    torch.testing.assert_close(int8_attention, fp32_attention, atol=0.02 * fp32_attention.abs().max(), rtol=0)
    save_quantized(tmp_path / "model.pt2", qmodel, x)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "model.pt2")(x), int8_attention)


def test_quantize_attention_int8_needs_calibration_data():
    """Without batches: a clear error, and the program is left as it was (no observers)."""
    qkv, table = torch.randn(1, 3, 2, 4, 8, 9), torch.randn(2, 3, 4)
    program = torch.export.export(Fp32Attention(), (qkv, table)).module()
    with pytest.raises(ValueError, match="no batches"):
        quantize_attention_int8(program, [])
    assert [name for name, _ in program.named_children() if "observer" in name] == []
    torch.testing.assert_close(program(qkv, table), Fp32Attention()(qkv, table))


@pytest.fixture
def kernel_must_not_run(monkeypatch):
    """Make any use of the int8 C kernel fail the test: argument checks come first."""
    import monai_qsa.networks.blocks.local_attention_int8 as module

    def library():
        raise AssertionError("the int8 C kernel was reached with mismatched arguments")

    monkeypatch.setattr(module, "_library", library)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0], a[1], 31, *a[3:]), "table must have shape"),  # table for kernel size 3
        (lambda a: (a[0][:, :1], *a[1:]), "qkv must be a floating-point tensor"),
        (lambda a: (a[0][:, :, :, :2], *a[1:]), r"table must have shape .* = \(2, 3, 2\)"),  # d_head 2, table for 4
        (lambda a: (a[0].unsqueeze(-1), *a[1:]), r"table must have shape .* = \(3, 3, 4\)"),  # 3D images, 2D table
        (lambda a: (a[0], a[1], 5, *a[3:]), "table must have shape"),
        (lambda a: (a[0], torch.randn(2, 2, 4), 2, *a[3:]), "kernel_size must be odd"),
        (lambda a: (*a[:3], -2, *a[4:]), "dilation must be between 1"),
        (lambda a: (*a[:4], float("nan"), *a[5:]), "scale must be a finite number"),
        (lambda a: (a[0], a[1].half(), *a[2:]), "share one dtype and device"),
    ],
    ids=["kernel-size", "qkv-parts", "d-head", "dims", "kernel-5", "even-kernel", "dilation", "scale", "dtype"],
)
def test_mismatched_arguments_are_a_value_error(change, message, kernel_must_not_run):
    problem = (torch.randn(1, 3, 2, 4, 5, 6), torch.randn(2, 3, 4), 3, 1, 0.5, 0.02, 0.03, 0.04)
    with pytest.raises(ValueError, match=message) as error:
        torch.ops.monai_qsa.local_attention_int8(*change(problem))
    assert "monai_qsa.local_attention_int8:" in str(error.value)


# dims, in_channels, heads, d_head, kernel, spatial, memory format of the input, bias: rows shorter and longer than
# the kernel's 16-position vectors, projected channels not a multiple of its 8 per pass (3 x 2 x 5 = 30)
PROJECTED_CASES = [
    (2, 8, 1, 8, 7, (32, 32), torch.channels_last, False),
    (2, 5, 2, 5, 5, (13, 67), torch.contiguous_format, True),
    (2, 32, 2, 16, 3, (6, 5), torch.channels_last, True),
    (3, 16, 2, 8, 3, (5, 6, 9), torch.channels_last_3d, False),
    (3, 3, 1, 4, 5, (3, 4, 41), torch.contiguous_format, True),
]


def projected_problem(dims, in_channels, heads, d_head, kernel_size, spatial, memory_format, bias):
    """A layer input, projection weight (a 1x1(x1) convolution's) and bias, and the attention's other arguments."""
    x = torch.randn((2, in_channels) + spatial).contiguous(memory_format=memory_format)
    weight = torch.randn((3 * heads * d_head, in_channels) + (1,) * dims) * in_channels**-0.5
    bias = torch.randn(3 * heads * d_head) if bias else None
    qkv = project_in_order(x, weight, bias).unflatten(1, (3, heads, d_head))
    scales = [symmetric_scale(qkv[:, part].abs().max()) for part in range(3)]
    return (x, weight, bias, 0.5 * torch.randn(dims, kernel_size, d_head), kernel_size, 1, d_head**-0.5, *scales), qkv


@pytest.mark.parametrize("case", PROJECTED_CASES)
def test_projected_attention_is_the_int8_attention_of_the_projection(case, monkeypatch):
    """Every path (C and PyTorch) gives, to the bit, the int8 attention of the projection project_in_order computes,
    and that projection is the convolution's up to the order of the sums."""
    problem, qkv = projected_problem(*case)
    x, weight, bias = problem[:3]
    convolution = torch.nn.functional.conv2d if x.ndim == 4 else torch.nn.functional.conv3d
    torch.testing.assert_close(qkv.flatten(1, 3), convolution(x, weight, bias), atol=1e-5, rtol=1e-5)
    for path in int8_attention_paths():
        monkeypatch.setenv(PATH_VARIABLE, path)
        expected = torch.ops.monai_qsa.local_attention_int8(qkv, *problem[3:])
        assert torch.equal(torch.ops.monai_qsa.projected_local_attention_int8(*problem), expected), path
    reference = local_attention_int8_reference(qkv, *problem[3:])
    assert torch.equal(projected_local_attention_int8_reference(*problem), reference)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 compiler flag")
def test_an_avx2_build_gives_the_outputs_of_this_machines_build(monkeypatch, fresh_library):
    """Built as for an AVX2-only CPU ($MONAI_QSA_KERNEL_CFLAGS=-mno-avx512f: vector steps of 8 positions in ymm
    registers, where an AVX-512 build takes 16), every path it has gives this machine's own build's output, plain and
    with the projection fused: the builds an AVX2-only CPU makes are tested on AVX-512 machines too."""
    problems = [(attention_problem(*case), None) for case in (CASES[0], CASES[3], CASES[5])]
    problems += [projected_problem(*case) for case in (PROJECTED_CASES[0], PROJECTED_CASES[3])]
    operators = [
        torch.ops.monai_qsa.local_attention_int8 if qkv is None else torch.ops.monai_qsa.projected_local_attention_int8
        for _, qkv in problems
    ]
    expected = [operator(*problem) for operator, (problem, _) in zip(operators, problems)]
    monkeypatch.setenv(CFLAGS_VARIABLE, "-mno-avx512f")
    _library.cache_clear()
    paths = [path for path in int8_attention_paths() if path != "torch"]
    assert {"avx2", "scalar"} <= set(paths)  # it was built (the machines this project runs on have AVX2)
    for path in paths:
        monkeypatch.setenv(PATH_VARIABLE, path)
        for operator, (problem, _), output in zip(operators, problems, expected):
            assert torch.equal(operator(*problem), output), path


def test_projected_attention_threads_do_not_change_the_result(monkeypatch):
    problem, _ = projected_problem(*PROJECTED_CASES[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.monai_qsa.projected_local_attention_int8(*problem)
        torch.set_num_threads(2)
        assert torch.equal(torch.ops.monai_qsa.projected_local_attention_int8(*problem), single)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0][:, :3], *a[1:]), r"weight must be .* in_channels = 3"),
        (lambda a: (a[0], a[1][:-1], *a[2:]), "weight must be"),  # rows not 3 x heads x d_head
        (lambda a: (a[0], a[1].expand(-1, -1, 3, 3), *a[2:]), "weight must be"),  # not a 1x1 convolution
        (lambda a: (*a[:2], torch.zeros(5), *a[3:]), r"bias must have shape \(24,\)"),
        (lambda a: (a[0][0], *a[1:]), "x must be"),
        (lambda a: (*a[:3], a[3][0], *a[4:]), "table must be"),
        (lambda a: (a[0].double(), *a[1:]), "x must be a dense tensor of the table's dtype"),
        (lambda a: (*a[:4], 5, *a[5:]), "table must have shape"),
        (lambda a: (*a[:8], 0.0, a[9]), "k_scale must be a positive finite int8 scale"),
    ],
    ids=["in-channels", "rows", "kernel", "bias", "x-dims", "table-dims", "dtype", "kernel-size", "k-scale"],
)
def test_projected_attention_mismatched_arguments_are_a_value_error(change, message, kernel_must_not_run):
    problem, _ = projected_problem(*PROJECTED_CASES[0])
    problem = (*problem[:2], torch.zeros(24), *problem[3:])
    with pytest.raises(ValueError, match=message) as error:
        torch.ops.monai_qsa.projected_local_attention_int8(*change(problem))
    assert "projected_local_attention_int8:" in str(error.value)


@pytest.mark.parametrize("dims", [2, 3])
def test_int8_saunet_fuses_every_projection_into_its_attention(dims, tmp_path):
    """quantize_ptq leaves one projected int8 attention node per SA layer (2D: after int8 convolutions; 3D: after
    int8_conv3d ones), no attention or projection of its own; fusing the program quantize_ptq leaves unfused
    (fuse_projections=False) gives the same program; its output is the unfused one's up to the int8 rounding of the
    layer inputs the fusion removes; saved and loaded unchanged; FLOPs counted as in fp32."""
    from monai_qsa.networks import SAUNet
    from monai_qsa.quantization import load_quantized, quantize_ptq, save_quantized
    from monai_qsa.quantization.int8_attention import fuse_attention_projections
    from monai_qsa.utils.complexity import count_flops

    torch.manual_seed(0)
    net = SAUNet(dims, 1, 2, features=(8, 16), kernel_size=3, num_heads=2, stem_stride=2, decoder="light").eval()
    calibration = [torch.rand((1, 1) + (16,) * dims) for _ in range(2)]
    x = torch.rand((1, 1) + (16,) * dims)
    fused = quantize_ptq(net, calibration, x, int8_conv3d=dims == 3)
    targets = [node.target for node in fused.program.graph.nodes]
    assert targets.count(torch.ops.monai_qsa.projected_local_attention_int8.default) == 5  # 2 x 2 encoder + 1 decoder
    assert torch.ops.monai_qsa.local_attention_int8.default not in targets
    with torch.no_grad():
        fused_output = fused(x)
    separate = quantize_ptq(net, calibration, x, int8_conv3d=dims == 3, fuse_projections=False)
    with torch.no_grad():
        separate_output = separate(x)
        assert fuse_attention_projections(separate.program) == 5
        torch.testing.assert_close(separate(x), fused_output)
    torch.testing.assert_close(fused_output, separate_output, atol=0.05 * separate_output.abs().max(), rtol=0)
    assert count_flops(fused, x) == count_flops(net, x)
    save_quantized(tmp_path / "model.pt2", fused, x)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "model.pt2")(x), fused_output)

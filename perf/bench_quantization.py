"""fp32 vs int8 latency and file size of SAUNet against MONAI's BasicUNet (the CNN baseline), 2D and 3D, at 1 and
2 threads, eager and compiled, both quantisation backends; and the attention operator alone: the fp32 fused kernel
against the int8 kernel on each instruction-set path this CPU runs, with the int8 kernel's integer operations per
second against this machine's int8 peak (a large ``torch._int_mm``, oneDNN), measured in the same run. Prints
medians and ratios measured in this run.

Inputs are random (latency does not depend on the values); calibration uses 2 random batches.

    python perf/bench_quantization.py [--repeats 5] [--cases 2d 3d attention-2d attention-3d]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from monai.networks.nets import BasicUNet

from monai_qsa.networks import SAUNet
from monai_qsa.networks.blocks.local_attention_int8 import (
    PATH_VARIABLE,
    int8_attention_paths,
    symmetric_scale,
)
from monai_qsa.quantization import quantize_ptq, save_quantized
from monai_qsa.quantization.int8_attention import quantize_attention_int8
from monai_qsa.utils.compile import compile_for_cpu
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size
from monai_qsa.utils.timing import median_seconds

#: input shape and the two networks of each case: SAUNet as in the sa_seg / sa_seg3d bundles, BasicUNet default
CASES = {
    "2d": ((1, 1, 256, 256), dict(spatial_dims=2, features=(16, 32, 64, 128), kernel_size=7, num_heads=4)),
    "3d": ((1, 1, 96, 96, 96), dict(spatial_dims=3, features=(8, 16, 32, 64), kernel_size=3, num_heads=2)),
}


#: the attention operator alone, at the first SA level of SAUNet in each case above: spatial_dims, image size,
#: channels, heads, kernel size
ATTENTION_CASES = {"attention-2d": (2, (128, 128), 64, 4, 7), "attention-3d": (3, (32, 32, 32), 32, 2, 5)}
#: SAUNet quantised by quantize_ptq, then its attention by quantize_attention_int8
INT8_ATTENTION_FORM = "int8 + int8 attention compiled"
#: side of the square int8 matrices whose product measures the int8 peak
PEAK_SIZE = 1024


def int8_peak_ops_per_second(repeats: int) -> float:
    """Integer operations per second (2 per multiply-accumulate) of an int8 x int8 -> int32 matrix product."""
    a, b = (torch.randint(-127, 128, (PEAK_SIZE, PEAK_SIZE), dtype=torch.int8) for _ in range(2))
    return 2 * PEAK_SIZE**3 / median_seconds(lambda: torch._int_mm(a, b), repeats, warmup=2)


def int8_attention_ops(dims: int, size: tuple[int, ...], channels: int, kernel_size: int) -> int:
    """Integer operations (2 per multiply-accumulate) of the int8 kernel, as it computes them: logits over channel
    groups of 4 (``d_head`` rounded up), weighted sums over neighbour rows in groups of 4 (``kernel_size`` rounded
    up), per head; heads x d_head = channels."""
    positions, row_neighbours = torch.Size(size).numel(), -(-kernel_size // 4) * 4
    logits = positions * kernel_size**dims * channels  # channels a multiple of 4 in ATTENTION_CASES
    weighted_sum = positions * channels * kernel_size ** (dims - 1) * row_neighbours
    return 2 * (logits + weighted_sum)


def bench_attention(case: str, repeats: int) -> None:
    """fp32 fused vs int8 attention operator, every int8 path, 1 and 2 threads; ratios and share of the int8 peak."""
    dims, size, channels, heads, kernel_size = ATTENTION_CASES[case]
    head_channels = channels // heads
    qkv = torch.randn((1, 3, heads, head_channels) + size)
    table = 0.5 * torch.randn(dims, kernel_size, head_channels)
    args = (qkv, table, kernel_size, 1, head_channels**-0.5)
    scales = [symmetric_scale(qkv[:, part].abs().max()) for part in range(3)]
    ops = int8_attention_ops(dims, size, channels, kernel_size)
    paths = [path for path in int8_attention_paths() if path != "torch"]  # the PyTorch fall-back: not a kernel
    print(
        f"\n{case}: C={channels}, {heads} heads, k={kernel_size}, image {size}; int8 kernel {ops / 1e9:.2f} G int ops"
    )
    for threads in (1, 2):
        torch.set_num_threads(threads)
        peak = int8_peak_ops_per_second(repeats)
        fp32 = median_seconds(lambda: torch.ops.monai_qsa.local_attention(*args), repeats, warmup=2)
        print(
            f"  {threads} thread(s) fp32 fused kernel {fp32 * 1e3:8.2f} ms; "
            f"int8 peak ({PEAK_SIZE}^2 torch._int_mm) {peak / 1e9:7.1f} G int ops/s"
        )
        for path in paths:
            os.environ[PATH_VARIABLE] = path
            int8 = median_seconds(lambda: torch.ops.monai_qsa.local_attention_int8(*args, *scales), repeats, warmup=2)
            print(
                f"  {threads} thread(s) int8 {path:12s} {int8 * 1e3:8.2f} ms  {fp32 / int8:5.2f}x fp32  "
                f"{ops / int8 / 1e9:6.1f} G int ops/s = {ops / int8 / peak:6.1%} of the int8 peak"
            )
        os.environ.pop(PATH_VARIABLE)


def variants(net: torch.nn.Module, x: torch.Tensor, artifact: str) -> tuple[dict[str, torch.nn.Module], int]:
    """The runnable forms of one network and the size of its int8 artifact."""
    calibration = [torch.randn_like(x), torch.randn_like(x)]
    pt2e = quantize_ptq(net, calibration, torch.cat(calibration))
    save_quantized(artifact, pt2e, torch.cat(calibration))
    forms = {
        "fp32 eager": net,
        "fp32 compiled": compile_for_cpu(net),
        "int8 x86_eager": quantize_ptq(net, calibration, x, backend="x86_eager"),
        "int8 x86_inductor compiled": compile_for_cpu(pt2e, freezing=True),
    }
    int8_attention = quantize_ptq(net, calibration, torch.cat(calibration))
    if quantize_attention_int8(int8_attention.program, calibration):  # networks with SA layers
        forms[INT8_ATTENTION_FORM] = compile_for_cpu(int8_attention, freezing=True)
    return forms, serialized_size(artifact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES) + sorted(ATTENTION_CASES),
        default=sorted(CASES) + sorted(ATTENTION_CASES),
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"torch {torch.__version__}, median of {args.repeats} runs after 2 warm-up runs, batch 1")
    for case in (case for case in args.cases if case in ATTENTION_CASES):
        bench_attention(case, args.repeats)
    for case in (case for case in args.cases if case in CASES):
        shape, sa_kwargs = CASES[case]
        dims = sa_kwargs["spatial_dims"]
        x = torch.randn(shape)
        nets = {
            "SAUNet": SAUNet(in_channels=1, out_channels=2, **sa_kwargs).eval(),
            "BasicUNet": BasicUNet(dims, 1, 2).eval(),
        }
        medians: dict[tuple[str, str, int], float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, net in nets.items():
                forms, int8_bytes = variants(net, x, os.path.join(tmp, f"{name}.pt2"))
                fp32_bytes = serialized_size(net)
                print(
                    f"\n{case} {name} {tuple(shape)}: {count_parameters(net) / 1e6:.3f} M params, "
                    f"{count_flops(net, x) / 1e9:.2f} GMAC, fp32 state_dict {fp32_bytes / 1e6:.2f} MB, "
                    f"int8 file {int8_bytes / 1e6:.2f} MB ({int8_bytes / fp32_bytes:.2f}x)"
                )
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    for form, model in forms.items():
                        with torch.no_grad():
                            seconds = median_seconds(lambda model=model, x=x: model(x), args.repeats, warmup=2)
                        medians[(name, form, threads)] = seconds
                        print(f"  {threads} thread(s) {form:32s} {seconds * 1e3:10.1f} ms")
        print(f"\n{case} ratios (speed-up = baseline time / SAUNet int8 x86_inductor compiled time):")
        for threads in (1, 2):
            int8 = medians[("SAUNet", "int8 x86_inductor compiled", threads)]
            for baseline in (
                ("SAUNet", "fp32 compiled"),
                ("SAUNet", "fp32 eager"),
                ("BasicUNet", "fp32 compiled"),
                ("BasicUNet", "fp32 eager"),
                ("BasicUNet", "int8 x86_inductor compiled"),
            ):
                print(
                    f"  {threads} thread(s) vs {' '.join(baseline):36s} {medians[baseline + (threads,)] / int8:6.2f}x"
                )
        print(f"\n{case} SAUNet {INT8_ATTENTION_FORM} (attention in int8 too), speed-up over:")
        for threads in (1, 2):
            int8_attention = medians[("SAUNet", INT8_ATTENTION_FORM, threads)]
            for baseline in ("fp32 compiled", "int8 x86_inductor compiled"):
                speed_up = medians[("SAUNet", baseline, threads)] / int8_attention
                print(f"  {threads} thread(s) vs SAUNet {baseline:29s} {speed_up:6.2f}x")


if __name__ == "__main__":
    main()

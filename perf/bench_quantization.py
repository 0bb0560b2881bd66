"""fp32 vs int8 latency and file size of SAUNet against MONAI's BasicUNet (the CNN baseline), 2D and 3D, at 1 and
2 threads, eager and compiled, both quantisation backends, with the int8 engine's steps one by one (PT2E only, +
int8 attention, + its projection fused, + the restore head fused, + int8 3D convolutions); and the attention
operator alone: the fp32 fused kernel against the int8 kernel on each instruction-set path this CPU runs, with the
int8 kernel's integer operations per second against this machine's int8 peak (a large ``torch._int_mm``, oneDNN),
measured in the same run. Prints medians and ratios measured in this run, and at the end the summary table of
docs/int8_attention.md.

The forms of a network are compiled for each thread count (TorchDynamo guards on it and compiles again when it
changes: Inductor writes its kernels for the count in force, serial code at 1 thread) and timed in turn, one call of
each per round, the order turning each round, so that changes in the machine's speed during the run reach them alike
(SAUNet's forms among themselves, BasicUNet's likewise: the ratios between the two networks come from separate
windows). Inputs are random (latency does not depend on the values); calibration uses 2 random batches.

    python perf/bench_quantization.py [--repeats 10] [--cases 2d 3d attention-2d attention-3d] [--saunet-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from monai.networks.nets import BasicUNet

from monai_qsa.benchmark.tasks import sa_network_def
from monai_qsa.bundle import bundle_dir
from monai_qsa.models import build_network
from monai_qsa.networks.blocks.local_attention import CFLAGS_VARIABLE
from monai_qsa.networks.blocks.local_attention_int8 import (
    PATH_VARIABLE,
    int8_attention_paths,
    symmetric_scale,
)
from monai_qsa.quantization import quantize_ptq, save_quantized
from monai_qsa.utils.compile import compile_for_cpu
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size
from monai_qsa.utils.cpu import cpu_model
from monai_qsa.utils.timing import in_turn
from monai_qsa.utils.timing import median_seconds as timed_median

#: input shape of each case and the bundle whose SAUNet it times (against BasicUNet's default)
CASES = {"2d": ((1, 1, 256, 256), "sa_seg"), "3d": ((1, 1, 96, 96, 96), "sa_seg3d")}


#: the attention operator alone, at fixed layers of a mid-sized SAUNet (not the bundles' first levels): spatial_dims,
#: image size, channels, heads, kernel size
ATTENTION_CASES = {"attention-2d": (2, (128, 128), 64, 4, 7), "attention-3d": (3, (32, 32, 32), 32, 2, 5)}
#: the int8 engine step by step: PT2E alone (fp32 attention, 3D convolutions computed in fp32), + the int8
#: attention (its projection a separate int8 convolution), + the projection fused into the attention's kernel,
#: + the resolution restore and head as one operator (in 3D only with int8 3D convolutions: there it comes with the
#: last form), + int8 3D convolutions (``int8_conv3d=True``, as sa_seg3d quantises); each compiled with freezing
PT2E_FORM = "int8 x86_inductor compiled"
INT8_ATTENTION_FORM = "int8 + int8 attention compiled"
FUSED_FORM = "int8 + int8 attention, fused projection compiled"
RESTORE_FORM = "int8 + fused int8 attention + fused restore head compiled"
INT8_ENGINE_FORM = "int8 + fused int8 attention, restore head + int8 conv3d compiled"
ENGINE_OPTIONS = {
    PT2E_FORM: dict(int8_attention=False, int8_conv3d=False, fuse_restore_head=False),
    INT8_ATTENTION_FORM: dict(int8_attention=True, int8_conv3d=False, fuse_projections=False, fuse_restore_head=False),
    FUSED_FORM: dict(int8_attention=True, int8_conv3d=False, fuse_restore_head=False),
    RESTORE_FORM: dict(int8_attention=True, int8_conv3d=False),
    INT8_ENGINE_FORM: dict(int8_attention=True, int8_conv3d=True),
}
#: side of the square int8 matrices whose product measures the int8 peak
PEAK_SIZE = 1024
#: "wall": wall-clock time; "thread": CPU time of the calling thread at 1 thread (the C kernels and Inductor's code
#: then run in it), wall-clock at 2 threads: for machines shared with other jobs, where waiting inflates wall time
CLOCKS = ("wall", "thread")
_clock = "wall"


def _timer() -> Callable[[], float]:
    """The clock chosen (``CLOCKS``) for the current thread count."""
    return time.thread_time if _clock == "thread" and torch.get_num_threads() == 1 else time.perf_counter


def median_seconds(fn, repeats: int, warmup: int) -> float:
    """Median time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, on the chosen clock (``CLOCKS``)."""
    return timed_median(fn, repeats, warmup, _timer())


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


def bench_attention(case: str, repeats: int) -> list[str]:
    """fp32 fused vs int8 attention operator, every int8 path, 1 and 2 threads; ratios and share of the int8 peak.
    Returns the rows of the summary table."""
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
    rows = []
    requested = os.environ.get(PATH_VARIABLE)  # the networks' cases run on it afterwards
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
            rows.append(
                f"| operator {case}, {path} | {threads} | {fp32 * 1e3:.2f} ms | {int8 * 1e3:.2f} ms | "
                f"{fp32 / int8:.2f}x | {ops / int8 / peak:.1%} of {peak / 1e9:.0f} G ops/s |"
            )
    if requested is None:
        os.environ.pop(PATH_VARIABLE)
    else:
        os.environ[PATH_VARIABLE] = requested
    return rows


def variants(
    net: torch.nn.Module, x: torch.Tensor, artifact: str, engine_only: bool
) -> tuple[dict[str, tuple[torch.nn.Module, bool | None]], int]:
    """The forms of one network (with ``engine_only``: fp32 compiled and the int8 engine's steps), each as
    ``(module, freezing)`` with ``freezing`` None for a form run eagerly, and the size of its default int8 artifact."""
    calibration = [torch.randn_like(x), torch.randn_like(x)]
    example = torch.cat(calibration)
    forms: dict[str, tuple[torch.nn.Module, bool | None]] = {"fp32 compiled": (net, False)}
    if not engine_only:
        forms["fp32 eager"] = (net, None)
        forms["int8 x86_eager"] = (quantize_ptq(net, calibration, x, backend="x86_eager"), None)
    programs = {form: quantize_ptq(net, calibration, example, **options) for form, options in ENGINE_OPTIONS.items()}
    save_quantized(artifact, programs[INT8_ENGINE_FORM], example)
    forms |= {form: (program, True) for form, program in programs.items()}
    return forms, serialized_size(artifact)


def time_in_turn(runners: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one call of each runner on the chosen clock, the runners called in turn for ``repeats``
    rounds (:func:`~monai_qsa.utils.timing.in_turn`, the order turning each round) after two warm-up calls each, so
    that changes in the machine's speed during the run reach every form alike."""
    clock = _timer()

    def call(form: str) -> float:
        start = clock()
        runners[form](x)
        return clock() - start

    with torch.no_grad():
        for runner in runners.values():  # compilation, allocator caches
            runner(x)
            runner(x)
        samples = in_turn(call, list(runners), repeats)
    return {form: statistics.median(times) for form, times in samples.items()}


def summary_rows(case: str, medians: dict[tuple[str, str, int], float]) -> list[str]:
    """The summary table's rows of one network case: each int8 form against SAUNet fp32 compiled."""
    rows = []
    for threads in (1, 2):
        fp32 = medians[("SAUNet", "fp32 compiled", threads)]
        ratios = " | ".join(
            f"{medians[('SAUNet', form, threads)] * 1e3:.1f} ms ({fp32 / medians[('SAUNet', form, threads)]:.2f}x)"
            for form in ENGINE_OPTIONS
        )
        rows.append(f"| SAUNet {case} {CASES[case][0][2:]} | {threads} | {fp32 * 1e3:.1f} ms | {ratios} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (rounds, for the networks) per form")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="wall, or thread CPU time at 1 thread")
    parser.add_argument(
        "--saunet-only", action="store_true", help="only SAUNet, compiled: fp32 and the int8 engine's steps"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES) + sorted(ATTENTION_CASES),
        default=sorted(CASES) + sorted(ATTENTION_CASES),
    )
    args = parser.parse_args()
    global _clock
    _clock = args.clock
    warnings.filterwarnings("ignore", category=UserWarning)
    print(
        f"torch {torch.__version__}, median of {args.repeats} runs after 2 warm-up runs, batch 1, {cpu_model()}, "
        f"clock {args.clock}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        f"{CFLAGS_VARIABLE}={os.environ.get(CFLAGS_VARIABLE, '')!r}, "
        f"{PATH_VARIABLE}={os.environ.get(PATH_VARIABLE, 'auto')!r}"
    )
    operator_rows, network_rows = [], []
    for case in (case for case in args.cases if case in ATTENTION_CASES):
        operator_rows += bench_attention(case, args.repeats)
    for case in (case for case in args.cases if case in CASES):
        # a fresh start for each case: the 2D and 3D SAUNets share one forward, which Dynamo would otherwise compile
        # for dynamic shapes after the first case (and Inductor cannot lower 3D SAUNets that way, docs/networks.md)
        torch._dynamo.reset()
        shape, bundle = CASES[case]
        dims = len(shape) - 2
        x = torch.randn(shape)
        nets = {"SAUNet": build_network(sa_network_def(bundle_dir(bundle))).eval()}
        if not args.saunet_only:
            nets["BasicUNet"] = BasicUNet(dims, 1, 2).eval()
        medians: dict[tuple[str, str, int], float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, net in nets.items():
                forms, int8_bytes = variants(net, x, os.path.join(tmp, f"{name}.pt2"), args.saunet_only)
                fp32_bytes = serialized_size(net)
                print(
                    f"\n{case} {name} {tuple(shape)}: {count_parameters(net) / 1e6:.3f} M params, "
                    f"{count_flops(net, x) / 1e9:.2f} GMAC, fp32 state_dict {fp32_bytes / 1e6:.2f} MB, "
                    f"int8 file {int8_bytes / 1e6:.2f} MB ({int8_bytes / fp32_bytes:.2f}x)"
                )
                for threads in (1, 2):
                    torch.set_num_threads(threads)  # TorchDynamo compiles every form again for each count
                    runners = {
                        form: model if freezing is None else compile_for_cpu(model, freezing=freezing)
                        for form, (model, freezing) in forms.items()
                    }
                    for form, seconds in time_in_turn(runners, x, args.repeats).items():
                        medians[(name, form, threads)] = seconds
                        print(f"  {threads} thread(s) {form:46s} {seconds * 1e3:10.1f} ms")
        if not args.saunet_only:
            print(f"\n{case} ratios (speed-up = baseline time / SAUNet {INT8_ENGINE_FORM} time):")
            for threads in (1, 2):
                int8 = medians[("SAUNet", INT8_ENGINE_FORM, threads)]
                for baseline in (
                    ("SAUNet", "fp32 eager"),
                    ("BasicUNet", "fp32 compiled"),
                    ("BasicUNet", "fp32 eager"),
                    ("BasicUNet", INT8_ENGINE_FORM),
                ):
                    speed_up = medians[baseline + (threads,)] / int8
                    print(f"  {threads} thread(s) vs {' '.join(baseline):48s} {speed_up:6.2f}x")
        network_rows += summary_rows(case, medians)
    print_summary(operator_rows, network_rows)


def print_summary(operator_rows: list[str], network_rows: list[str]) -> None:
    """The tables of docs/int8_attention.md: speed-ups over fp32 in this run."""
    if operator_rows:
        print("\n| case | threads | fp32 fused | int8 | int8 / fp32 speed-up | share of the int8 peak |")
        print("|---|---|---|---|---|---|")
        print("\n".join(operator_rows))
    if network_rows:
        print(f"\n| network | threads | fp32 compiled | {' | '.join(ENGINE_OPTIONS)} |")
        print("|---|---|---|" + "---|" * len(ENGINE_OPTIONS))
        print("\n".join(network_rows))


if __name__ == "__main__":
    main()

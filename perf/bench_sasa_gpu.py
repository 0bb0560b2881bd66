"""SASA layer and SA networks on a CUDA GPU: the Triton kernels against the convolutions they replace.

Layers (training step = forward, mean-square loss, backward; inference = forward under ``torch.no_grad()``):

- 2D, batch 8, C=64, 128x128, k=7 (8 heads); 3D, batch 2, C=32, 48^3, k=3 and 32^3, k=5 (8 heads);
- against ``Conv2d``/``Conv3d`` with the same kernel size (the baseline of the ratios) and with 3x3(x3); the 2D case
  also through the PyTorch-operations path the layer ran on GPUs before the Triton kernels (eager only);
- eager and ``torch.compile``; fp32 and bf16 (module and input cast to bf16); peak memory of one call beyond what was
  allocated before it (``torch.cuda.max_memory_allocated``).

Networks (training step): the bundles' networks (``network_def`` of each bundle's ``inference.json``) at their
training batch and patch size, against MONAI's ``UNet`` with the same channels (segmentation bundles) or ``ResNet``
with the same widths and blocks (the classification bundle).

Prints medians of CUDA-event timings, and ratios against the baseline measured in the same run, with the GPU's name.
Rows are run in order of importance (layers eager, networks eager, then compiled) until ``--budget-s`` is spent; the
rows left out are listed. ``--dry-run`` runs every code path on the CPU on tiny shapes (checks the script, times
nothing meaningful).

    python perf/bench_sasa_gpu.py [--repeats 10] [--budget-s 420] [--dtypes fp32,bf16] [--modes eager,compiled]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from monai.bundle import ConfigParser
from monai.networks.nets import ResNet, UNet

from monai_qsa.networks.blocks import StandAloneSelfAttention
from monai_qsa.networks.blocks.local_attention_triton import triton_supports

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Case(NamedTuple):
    """One comparison: an input shape, the modules to time, the baseline of the ratios, the parts to time."""

    label: str
    shape: tuple[int, ...]
    modules: dict[str, Callable[[], torch.nn.Module]]
    baseline: str
    parts: tuple[str, ...]
    eager_only: tuple[str, ...] = ()


class PyTorchPathSASA(torch.nn.Module):
    """The layer through its PyTorch-operations path (requesting the attention selects it)."""

    def __init__(self, layer: StandAloneSelfAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, return_attention=True)[0]


def layer_case(dims: int, batch: int, channels: int, size: int, kernel: int) -> Case:
    """SASA (8 heads) against dense convolutions with its kernel size and with 3, same channels."""
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    cube = "x".join([str(size)] * dims)
    dense, small = f"conv {kernel}^{dims}", f"conv 3^{dims}"
    modules = {
        "sasa": lambda: StandAloneSelfAttention(dims, channels, channels, kernel_size=kernel, num_heads=8),
        dense: lambda: conv(channels, channels, kernel, padding=kernel // 2),
        small: lambda: conv(channels, channels, 3, padding=1),
    }
    eager_only = ()
    if dims == 2:
        modules["sasa pytorch-path"] = lambda: PyTorchPathSASA(modules["sasa"]())
        eager_only = ("sasa pytorch-path",)
    shape = (batch, channels) + (size,) * dims
    return Case(f"{dims}D {batch}x{channels}x{cube} k={kernel}", shape, modules, dense, ("train", "infer"), eager_only)


def bundle_network(name: str) -> torch.nn.Module:
    """The network of bundle ``name`` as its inference config defines it."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def network_cases(dry_run: bool) -> list[Case]:
    """Each bundle's network at its training batch and patch size, against the MONAI network of the same widths."""
    seg = {"sa_seg": (2, (16, 32, 64, 128), 8, 64), "sa_seg3d": (3, (8, 16, 32, 64), 4, 32)}
    cases = []
    for name, (dims, features, batch, size) in seg.items():
        batch, size = (1, 16) if dry_run else (batch, size)
        modules = {
            f"{name} SAUNet": lambda name=name: bundle_network(name),
            "MONAI UNet": lambda dims=dims, f=features: UNet(dims, 1, 2, channels=f, strides=(2,) * (len(f) - 1)),
        }
        shape = (batch, 1) + (size,) * dims
        cases.append(Case(f"{name} network {'x'.join(map(str, shape))}", shape, modules, "MONAI UNet", ("train",)))
    batch, size = (2, 32) if dry_run else (16, 64)
    resnet = lambda: ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=2, n_input_channels=1, num_classes=3)  # noqa: E731
    modules = {"sa_cls SAResNet": lambda: bundle_network("sa_cls"), "MONAI ResNet": resnet}
    shape = (batch, 1, size, size)
    cases.append(Case(f"sa_cls network {'x'.join(map(str, shape))}", shape, modules, "MONAI ResNet", ("train",)))
    return cases


def layer_cases(dry_run: bool) -> list[Case]:
    if dry_run:
        return [layer_case(2, 1, 16, 12, 5), layer_case(3, 1, 32, 8, 3)]
    return [layer_case(2, 8, 64, 128, 7), layer_case(3, 2, 32, 48, 3), layer_case(3, 2, 32, 32, 5)]


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median time of ``fn()`` in milliseconds over ``repeats`` calls after two warm-up calls: CUDA events on a GPU,
    wall time on the CPU."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of ``fn()`` allocates beyond what was allocated before it (MiB); None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def step_function(module: torch.nn.Module, x: torch.Tensor, part: str) -> Callable[[], None]:
    """One training step (forward, mean-square loss, backward) or one inference call of ``module`` on ``x``."""

    def train() -> None:
        module.zero_grad(set_to_none=True)
        module(x).float().square().mean().backward()

    def infer() -> None:
        with torch.no_grad():
            module(x)

    return train if part == "train" else infer


class Row(NamedTuple):
    case: str
    impl: str
    dtype: str
    mode: str
    part: str
    ms: float
    mib: float | None


def measure_case(case: Case, dtype: str, mode: str, repeats: int, device: torch.device) -> list[Row]:
    """Every module and part of ``case`` in one dtype and mode."""
    rows = []
    torch.manual_seed(0)
    x = torch.randn(case.shape, device=device, dtype=DTYPES[dtype])
    for name, build in case.modules.items():
        if mode == "compiled" and name in case.eager_only:
            continue
        module = build().to(device=device, dtype=DTYPES[dtype])
        runnable = torch.compile(module) if mode == "compiled" else module
        for part in case.parts:
            step = step_function(runnable, x, part)
            rows.append(
                Row(case.label, name, dtype, mode, part, median_ms(step, repeats, device), peak_mib(step, device))
            )
        del module, runnable
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[Row], baseline: str) -> None:
    """The rows of one case, dtype and mode, each with its ratios to the baseline's time and memory."""
    reference = {row.part: row for row in rows if row.impl == baseline}
    for row in rows:
        base = reference.get(row.part)
        time_ratio = f"{row.ms / base.ms:8.2f}x" if base else f"{'-':>9s}"
        memory = f"{row.mib:9.1f}" if row.mib is not None else f"{'-':>9s}"
        memory_ratio = f"{row.mib / base.mib:8.2f}x" if base and row.mib and base.mib else f"{'-':>9s}"
        print(
            f"{row.case:34s} {row.impl:22s} {row.dtype:5s} {row.mode:9s} {row.part:6s} {row.ms:10.2f} {time_ratio} "
            f"{memory} {memory_ratio}",
            flush=True,
        )


def correctness_check(device: torch.device, dry_run: bool) -> None:
    """Print the largest difference between the layer's fused output and its PyTorch path (2D case, batch 1)."""
    torch.manual_seed(0)
    size = 12 if dry_run else 128
    layer = StandAloneSelfAttention(2, 64, 64, kernel_size=7, num_heads=8).to(device)
    x = torch.randn(1, 64, size, size, device=device, requires_grad=True)
    fused, reference = layer(x), layer(x, return_attention=True)[0]
    fused_grad = torch.autograd.grad(fused.square().mean(), x)[0]
    reference_grad = torch.autograd.grad(reference.square().mean(), x)[0]
    print(
        f"check: fused vs PyTorch path, 2D k=7: output max |diff| {(fused - reference).abs().max().item():.2e}, "
        f"input gradient max |diff| {(fused_grad - reference_grad).abs().max().item():.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new rows after this many seconds")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script's code paths")
    args = parser.parse_args()
    dtypes, modes = args.dtypes.split(","), args.modes.split(",")
    for name, values, allowed in (("--dtypes", dtypes, DTYPES), ("--modes", modes, ("eager", "compiled"))):
        if not set(values) <= set(allowed):
            raise ValueError(f"{name} must be a comma-separated subset of {sorted(allowed)}, got {values}.")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}.")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark needs one (--dry-run checks the script on the CPU).")
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    kernels = "the C kernels"
    if device.type == "cuda":
        probe = torch.empty((1, 3, 1, 2, 1, 1), device=device)
        kernels = "the Triton kernels" if triton_supports(probe, probe) else "its PyTorch path (no Triton)"
    print(f"device: {name}; torch {torch.__version__}; SASA attention runs {kernels}")
    print(f"medians of {args.repeats} ({'CUDA events' if device.type == 'cuda' else 'wall time'}); ratios against the")
    print("baseline of the same case, dtype, mode and part; peak = memory one call allocates beyond what was before")
    correctness_check(device, args.dry_run)
    header = f"{'case':34s} {'impl':22s} {'dtype':5s} {'mode':9s} {'part':6s} {'median ms':>10s} {'/ base':>9s}"
    print(f"{header} {'peak MiB':>9s} {'/ base':>9s}")
    layers, networks = layer_cases(args.dry_run), network_cases(args.dry_run)
    plan = [(case, dtype, mode) for mode in modes for cases in (layers, networks) for case in cases for dtype in dtypes]
    began = time.perf_counter()
    for index, (case, dtype, mode) in enumerate(plan):
        if time.perf_counter() - began > args.budget_s:
            left = ", ".join(f"{c.label} {d} {m}" for c, d, m in plan[index:])
            print(f"budget of {args.budget_s:.0f} s spent; not measured: {left}")
            break
        print_rows(measure_case(case, dtype, mode, args.repeats, device), case.baseline)
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

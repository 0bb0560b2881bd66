"""SASA layer speed and memory.

Inference: the layer as it runs inference (fused C kernel), its PyTorch-operations path (what runs without a C
compiler, and for attention maps), an unfold (im2col) implementation of the same function, and the dense
convolution it replaces; one thread, eager and compiled.

Training: one step (forward, backward of a mean-square loss) of the layer (fused C kernel and its backward pass),
of its PyTorch-operations path and of the dense convolutions it replaces, and of the bundles' SAUNets (sa_seg,
sa_seg3d, at their training batch and patch sizes) against MONAI's UNet with the same channels; 1 and 2 threads.

Prints medians and ratios measured in this run.

    python perf/bench_sasa.py [--repeats 5] [--part all|inference|training]
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from monai_qsa.benchmark.tasks import sa_network_def
from monai_qsa.bundle import bundle_dir
from monai_qsa.models import build_network
from monai_qsa.networks.blocks import StandAloneSelfAttention
from monai_qsa.networks.blocks.local_attention import relative_logits, relative_position_table
from monai_qsa.networks.nets import SAUNet
from monai_qsa.utils.compile import compile_for_cpu
from monai_qsa.utils.complexity import count_flops
from monai_qsa.utils.timing import median_seconds, peak_memory_bytes


class UnfoldSASA(torch.nn.Module):
    """The same function as ``StandAloneSelfAttention`` (stride 1, no dilation) through an explicit im2col of
    keys and values: ``k^d`` copies of each, the textbook implementation."""

    def __init__(self, layer: StandAloneSelfAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, dims = self.layer, self.layer.spatial_dims
        batch, spatial = x.shape[0], tuple(x.shape[2:])
        heads, d, k, pad = layer.num_heads, layer.head_channels, layer.kernel_size, layer.padding
        q, key, v = layer.qkv(x).reshape((batch, 3, heads, d) + spatial).unbind(1)
        q = q * layer.scale

        def im2col(t: torch.Tensor) -> torch.Tensor:  # (B, heads, d, *S) -> (B, heads, d, k^d, N)
            t = F.pad(t.flatten(0, 1), [pad] * (2 * dims))
            for axis in range(2, 2 + dims):
                t = t.unfold(axis, k, 1)
            t = t.movedim(tuple(range(2, 2 + dims)), tuple(range(-dims, 0))).contiguous()  # the k^d copies
            return t.reshape(batch, heads, t.shape[1], k**dims, -1)

        keys, values = im2col(key), im2col(v)
        inside = im2col(torch.ones((1, 1, 1) + spatial).expand(batch, heads, 1, *spatial))[:, :, 0] > 0
        table = relative_position_table(list(layer.rel_pos), layer.axis_channels)
        rel = relative_logits(q, table).flatten(3)  # (B, heads, k^d, N)
        logits = torch.einsum("bhdn,bhdkn->bhkn", q.flatten(3), keys) + rel
        attn = logits.masked_fill(~inside, float("-inf")).softmax(2)
        out = torch.einsum("bhkn,bhdkn->bhdn", attn, values)
        return out.reshape((batch, layer.out_channels) + spatial)


class PyTorchPathSASA(torch.nn.Module):
    """The layer through its differentiable PyTorch-operations path (requesting the attention selects it)."""

    def __init__(self, layer: StandAloneSelfAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, return_attention=True)[0]


def inference_benchmarks(repeats: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = [(2, 64, (128, 128), 7), (3, 32, (32, 32, 32), 5)]
    print(f"Inference: torch {torch.__version__}, 1 thread, median of {repeats}; peak = extra memory of one call")
    print(f"{'case':28s} {'impl':16s} {'mode':8s} {'median ms':>10s} {'peak MiB':>9s} {'GMAC':>7s}")
    for dims, channels, spatial, k in cases:
        x = torch.randn((1, channels) + spatial)
        sasa = StandAloneSelfAttention(dims, channels, channels, kernel_size=k, num_heads=8).eval()
        conv_cls = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        impls = {
            "sasa": sasa,
            "sasa-pytorch": PyTorchPathSASA(sasa).eval(),
            "unfold-sasa": UnfoldSASA(sasa).eval(),
            "dense-conv": conv_cls(channels, channels, k, padding=k // 2).eval(),
        }
        with torch.no_grad():
            for name in ("sasa-pytorch", "unfold-sasa"):
                torch.testing.assert_close(impls[name](x), sasa(x), atol=1e-4, rtol=1e-4)
            results = {}
            for name, module in impls.items():
                macs = count_flops(module if name == "dense-conv" else sasa, x) / 1e9
                for mode in ("eager", "compiled"):
                    call = functools.partial(module if mode == "eager" else compile_for_cpu(module), x)
                    call()  # compile / warm up
                    seconds = median_seconds(call, repeats=repeats)
                    peak = peak_memory_bytes(call) / 2**20
                    results[name, mode] = seconds
                    label = f"{dims}D 1x{channels}x{'x'.join(map(str, spatial))} k={k}"
                    print(f"{label:28s} {name:16s} {mode:8s} {seconds * 1e3:10.1f} {peak:9.1f} {macs:7.2f}")
        for mode in ("eager", "compiled"):
            print(
                f"  {dims}D {mode}: pytorch/sasa = {results['sasa-pytorch', mode] / results['sasa', mode]:.2f}x, "
                f"unfold/sasa = {results['unfold-sasa', mode] / results['sasa', mode]:.2f}x, "
                f"conv/sasa = {results['dense-conv', mode] / results['sasa', mode]:.2f}x"
            )


def training_step(module: torch.nn.Module, x: torch.Tensor):
    """One training step of ``module`` on ``x`` (forward, mean-square loss, backward), as a callable."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    return step


def training_cases() -> dict[str, tuple[torch.Tensor, dict[str, torch.nn.Module], str]]:
    """Per case: the input, the modules to time and the name of the baseline the ratios are taken against."""
    torch.manual_seed(0)
    sasa_2d = StandAloneSelfAttention(2, 64, 64, kernel_size=7, num_heads=8)
    sasa_3d = StandAloneSelfAttention(3, 32, 32, kernel_size=5, num_heads=8)
    features = (16, 32, 64, 128)  # the bundles' networks' channels
    return {
        "2D 2x64x64x64 k=7": (
            torch.randn(2, 64, 64, 64),
            {
                "sasa": sasa_2d,
                "sasa-pytorch": PyTorchPathSASA(sasa_2d),
                "conv 7x7": torch.nn.Conv2d(64, 64, 7, padding=3),
                "conv 3x3": torch.nn.Conv2d(64, 64, 3, padding=1),
            },
            "conv 7x7",
        ),
        "3D 1x32x32x32x32 k=5": (
            torch.randn(1, 32, 32, 32, 32),
            # no PyTorch-path row: about 20 s per step on one thread
            {"sasa": sasa_3d, "conv 5x5x5": torch.nn.Conv3d(32, 32, 5, padding=2)},
            "conv 5x5x5",
        ),
        "sa_seg SAUNet 8x1x64x64": (
            torch.randn(8, 1, 64, 64),
            {
                "classic k=5": SAUNet(2, 1, 2, features=features, kernel_size=5, num_heads=4),
                "sa_seg network": build_network(sa_network_def(bundle_dir("sa_seg"))),
                "MONAI UNet": UNet(2, 1, 2, channels=features, strides=(2, 2, 2)),
            },
            "MONAI UNet",
        ),
        "sa_seg3d SAUNet 4x1x32^3": (
            torch.randn(4, 1, 32, 32, 32),
            {
                "sa_seg3d network": build_network(sa_network_def(bundle_dir("sa_seg3d"))),
                "MONAI UNet": UNet(3, 1, 2, channels=features, strides=(2, 2, 2)),
            },
            "MONAI UNet",
        ),
    }


def training_benchmarks(repeats: int, case: str | None = None) -> None:
    print(f"Training step (forward + backward), torch {torch.__version__}, eager, median of {repeats}")
    print(f"{'case':26s} {'impl':16s} {'threads':>7s} {'median ms':>10s} {'/ baseline':>10s}")
    for label, (x, modules, baseline) in training_cases().items():
        if case and case not in label:
            continue
        for threads in (1, 2):
            torch.set_num_threads(threads)
            medians = {name: median_seconds(training_step(module, x), repeats) for name, module in modules.items()}
            for name, seconds in medians.items():
                ratio = seconds / medians[baseline]
                print(f"{label:26s} {name:16s} {threads:7d} {seconds * 1e3:10.1f} {ratio:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("all", "inference", "training"), default="all")
    parser.add_argument("--case", help="run only the training cases whose name contains this text")
    args = parser.parse_args()
    if args.part in ("all", "inference"):
        inference_benchmarks(args.repeats)
    if args.part in ("all", "training"):
        training_benchmarks(args.repeats, args.case)


if __name__ == "__main__":
    main()

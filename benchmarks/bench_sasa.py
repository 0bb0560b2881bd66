"""SASA layer speed and memory: the layer as it runs inference (fused C kernel), its PyTorch-operations path (what
training runs, and inference without a C compiler), an unfold (im2col) implementation of the same function, and
the dense convolution it replaces; one thread, eager and compiled. Prints medians and ratios measured in this
run.

    python benchmarks/bench_sasa.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_seconds, peak_memory_bytes  # noqa: E402

from monai_qsa.networks.blocks import StandAloneSelfAttention  # noqa: E402
from monai_qsa.networks.blocks.local_attention import relative_logits, relative_position_table  # noqa: E402
from monai_qsa.utils.compile import compile_for_cpu  # noqa: E402
from monai_qsa.utils.complexity import count_flops  # noqa: E402


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
        rel = relative_logits(q, relative_position_table(list(layer.rel_pos), layer.axis_channels)).flatten(3)  # (B, heads, k^d, N)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = [(2, 64, (128, 128), 7), (3, 32, (32, 32, 32), 5)]
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats}; peak = extra resident memory of one call")
    print(f"{'case':28s} {'impl':14s} {'mode':8s} {'median ms':>10s} {'peak MiB':>9s} {'GMAC':>7s}")
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
                    fn = module if mode == "eager" else compile_for_cpu(module)
                    fn(x)  # compile / warm up
                    seconds = median_seconds(lambda: fn(x), repeats=args.repeats)
                    peak = peak_memory_bytes(lambda: fn(x)) / 2**20
                    results[name, mode] = seconds
                    label = f"{dims}D 1x{channels}x{'x'.join(map(str, spatial))} k={k}"
                    print(f"{label:28s} {name:14s} {mode:8s} {seconds * 1e3:10.1f} {peak:9.1f} {macs:7.2f}")
        for mode in ("eager", "compiled"):
            print(
                f"  {dims}D {mode}: pytorch/sasa = {results['sasa-pytorch', mode] / results['sasa', mode]:.2f}x, "
                f"unfold/sasa = {results['unfold-sasa', mode] / results['sasa', mode]:.2f}x, "
                f"conv/sasa = {results['dense-conv', mode] / results['sasa', mode]:.2f}x"
            )


if __name__ == "__main__":
    main()

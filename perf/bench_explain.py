"""What attention maps cost: SAUNet inference time before any map was requested, with maps requested
(``attention_maps``), and again afterwards (no hook may stay behind). Prints medians and ratios from one run.

    python perf/bench_explain.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from monai_qsa.networks import SAUNet
from monai_qsa.utils.timing import median_seconds
from monai_qsa.visualize import attention_maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {
        "2D 1x1x256x256 (sa_seg network)": (SAUNet(2, 1, 2, kernel_size=5).eval(), torch.randn(1, 1, 256, 256)),
        "3D 1x1x64x64x64 (sa_seg3d network)": (
            SAUNet(3, 1, 2, features=(8, 16, 32, 64), kernel_size=3, num_heads=2).eval(),
            torch.randn(1, 1, 64, 64, 64),
        ),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, eager, median of {args.repeats}")
    for label, (net, x) in cases.items():
        with torch.no_grad():
            before = median_seconds(lambda net=net, x=x: net(x), args.repeats)
            with_maps = median_seconds(lambda net=net, x=x: attention_maps(net, x), args.repeats)
            after = median_seconds(lambda net=net, x=x: net(x), args.repeats)
        print(
            f"{label}: inference {before * 1e3:.0f} ms; "
            f"with maps {with_maps * 1e3:.0f} ms ({with_maps / before:.2f}x); "
            f"inference after maps {after * 1e3:.0f} ms ({after / before:.2f}x of before)"
        )


if __name__ == "__main__":
    main()

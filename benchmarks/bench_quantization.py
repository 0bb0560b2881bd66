"""fp32 vs int8 latency and file size of SAUNet against MONAI's BasicUNet (the CNN baseline), 2D and 3D, at 1 and
2 threads, eager and compiled, both quantisation backends. Prints medians and ratios measured in this run.

Inputs are random (latency does not depend on the values); calibration uses 2 random batches.

    python benchmarks/bench_quantization.py [--repeats 5] [--cases 2d 3d]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch
from monai.networks.nets import BasicUNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_seconds  # noqa: E402

from monai_qsa.networks import SAUNet  # noqa: E402
from monai_qsa.quantization import quantize_ptq, save_quantized  # noqa: E402
from monai_qsa.utils.compile import compile_for_cpu  # noqa: E402
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size  # noqa: E402

#: input shape and the two networks of each case: SAUNet as in the sa_seg / sa_seg3d bundles, BasicUNet default
CASES = {
    "2d": ((1, 1, 256, 256), dict(spatial_dims=2, features=(16, 32, 64, 128), kernel_size=7, num_heads=4)),
    "3d": ((1, 1, 96, 96, 96), dict(spatial_dims=3, features=(8, 16, 32, 64), kernel_size=3, num_heads=2)),
}


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
    return forms, serialized_size(artifact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"torch {torch.__version__}, median of {args.repeats} runs after 2 warm-up runs, batch 1")
    for case in args.cases:
        shape, sa_kwargs = CASES[case]
        dims = sa_kwargs["spatial_dims"]
        x = torch.randn(shape)
        nets = {"SAUNet": SAUNet(in_channels=1, out_channels=2, **sa_kwargs).eval(), "BasicUNet": BasicUNet(dims, 1, 2).eval()}
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
                            seconds = median_seconds(lambda model=model: model(x), args.repeats, warmup=2)
                        medians[(name, form, threads)] = seconds
                        print(f"  {threads} thread(s) {form:28s} {seconds * 1e3:10.1f} ms")
        print(f"\n{case} ratios (speed-up = baseline time / SAUNet int8 x86_inductor compiled time):")
        for threads in (1, 2):
            int8 = medians[("SAUNet", "int8 x86_inductor compiled", threads)]
            for baseline in (("SAUNet", "fp32 compiled"), ("SAUNet", "fp32 eager"), ("BasicUNet", "fp32 compiled"), ("BasicUNet", "fp32 eager"), ("BasicUNet", "int8 x86_inductor compiled")):
                print(f"  {threads} thread(s) vs {' '.join(baseline):36s} {medians[baseline + (threads,)] / int8:6.2f}x")


if __name__ == "__main__":
    main()

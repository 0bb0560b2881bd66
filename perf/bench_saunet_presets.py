"""Cost of each SAUNet preset (``SAUNET_PRESETS``) against MONAI's UNet with the same channels
(``UNet(channels=features, strides=(2, ...), num_res_units=2)``, which strides in its first layer): parameters,
multiply-accumulates (``count_flops``) and compiled fp32 latency (``compile_for_cpu``), 2D at 1x1x256x256 and 3D at
1x1x96x96x96, one thread, batch 1. 3D presets are built with ``kernel_size=3`` (what the sa_seg3d bundle uses: a 7^3
neighbourhood costs 343 logits per voxel and head). Prints medians and ratios against the UNet measured in this run,
as a Markdown table. Networks are timed in interleaved rounds (one call of each per round), so that the load of
a shared machine changing during the run biases no ratio.

Inputs are random (latency does not depend on the values).

    python perf/bench_saunet_presets.py [--repeats 7] [--dims 2 3] [--presets classic s2_light]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import UNet

from monai_qsa.networks.nets import SAUNET_PRESETS, SAUNet
from monai_qsa.utils.compile import compile_for_cpu
from monai_qsa.utils.complexity import count_flops, count_parameters

#: input side length and the arguments given to every preset, per spatial_dims
CASES = {2: (256, {}), 3: (96, {"kernel_size": 3})}


def time_interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median compiled latency (seconds) of each model; one call of every model per round, so that a change of load
    on the machine during the run affects all of them alike."""
    compiled = {name: compile_for_cpu(model.eval(), dynamic=False) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in compiled.values():
            for _ in range(2):  # compilation, then a warm run
                model(x)
        for _ in range(repeats):
            for name, model in compiled.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(dims: int, presets: list[str], repeats: int) -> None:
    """One Markdown table: the channel-matched UNets, then each preset with its ratios against its UNet."""
    size, overrides = CASES[dims]
    x = torch.randn((1, 1) + (size,) * dims)
    models: dict[str, torch.nn.Module] = {}
    unet_of = {name: f"UNet {tuple(SAUNET_PRESETS[name]['features'])}" for name in presets}
    for features in dict.fromkeys(tuple(SAUNET_PRESETS[name]["features"]) for name in presets):
        models[f"UNet {features}"] = UNet(
            dims, 1, 2, channels=features, strides=(2,) * (len(features) - 1), num_res_units=2
        )
    models.update({name: SAUNet(dims, 1, 2, preset=name, **overrides) for name in presets})
    macs = {name: count_flops(model.eval(), x) for name, model in models.items()}
    seconds = time_interleaved(models, x, repeats)
    print(f"\n{dims}D, input {tuple(x.shape)}, presets with {overrides or 'no overrides'}")
    print("| network | parameters | GMACs | MACs / UNet | latency (ms) | latency / UNet |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, model in models.items():
        unet = unet_of.get(name, name)
        print(
            f"| {name} | {count_parameters(model):,} | {macs[name] / 1e9:.3f} | {macs[name] / macs[unet]:.2f} | "
            f"{1e3 * seconds[name]:.1f} | {seconds[name] / seconds[unet]:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--presets", nargs="+", default=list(SAUNET_PRESETS), choices=list(SAUNET_PRESETS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    # every network is compiled for its static input shape: one recompilation of the shared forward code per network
    torch._dynamo.config.recompile_limit = 64
    print(
        f"torch {torch.__version__}, 1 thread, median of {args.repeats} interleaved runs after 2 warm-up runs, batch 1"
    )
    for dims in args.dims:
        bench(dims, args.presets, args.repeats)


if __name__ == "__main__":
    main()

"""Command line: ``python -m monai_qsa {infer,explain,benchmark,dataset} ...`` (also installed as ``monai-qsa``)."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _infer(args: argparse.Namespace) -> int:
    from monai_qsa.inference.batch import OutputFolderError, run_batch_inference

    try:
        return run_batch_inference(
            args.bundle,
            args.input,
            args.output,
            int8=args.int8,
            recursive=args.recursive,
            overwrite=args.overwrite,
            device=args.device,
        )
    except OutputFolderError as error:  # an OSError, but a setup error of this run: exit 2 like the others
        print(f"error: {error}", file=sys.stderr)
        return 2


def _explain(args: argparse.Namespace) -> int:
    from monai_qsa.visualize import explain

    return explain(args.bundle, args.input, args.output, int8=args.int8, methods=tuple(args.methods))


def _sweep(args: argparse.Namespace) -> int:
    from monai_qsa.benchmark.sweep import run_sweep
    from monai_qsa.benchmark.sweep_report import update_readme_with_sweep

    if len(args.seeds) != 1:
        raise ValueError(f"--sweep trains each model with one seed, got --seeds {args.seeds}.")
    report = run_sweep(
        args.task,
        args.output,
        dataset_dir=args.dataset_dir,
        runs_dir=args.runs_dir,
        max_epochs=args.epochs,
        patience=args.patience,
        val_interval=args.val_interval,
        seed=args.seeds[0],
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        threads=tuple(args.threads),
        max_cases=args.max_cases,
        tolerance=args.tolerance,
        volume_shape=() if args.no_end_to_end else args.volume_shape,
        compile=not args.eager,
        retrain=args.retrain,
        retime=args.retime,
        bundle_dir=args.bundle_dir,
    )
    if args.update_readme:
        update_readme_with_sweep(args.update_readme, report)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from monai_qsa.benchmark import run_benchmark
    from monai_qsa.benchmark.report import update_readme

    if args.sweep:
        return _sweep(args)
    report = run_benchmark(
        args.task,
        args.output,
        dataset_dir=args.dataset_dir,
        epochs=args.epochs,
        seeds=tuple(args.seeds),
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        threads=tuple(args.threads),
        max_cases=args.max_cases,
        baseline=args.baseline,
        retrain=args.retrain,
        compile=not args.eager,
        bundle_dir=args.bundle_dir,
    )
    if args.update_readme:
        update_readme(args.update_readme, report)
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from monai_qsa.data import make_synthetic_dataset

    print(make_synthetic_dataset(args.task, args.output, seed=args.seed))
    return 0


def _add_bundle_arguments(parser: argparse.ArgumentParser, input_help: str, output_help: str, int8_help: str) -> None:
    parser.add_argument("--bundle", required=True, help="bundle folder (configs/inference.json, trained models/)")
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--int8", action="store_true", help=int8_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monai_qsa", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    infer = commands.add_parser(
        "infer",
        help="run a bundle over a folder of images",
        description="Run a bundle's inference over every file of a folder, one case in memory at a time. Segmentation "
        "writes <name>_seg.nii.gz in the input's geometry, classification one row per image in probabilities.csv; "
        "each run writes inference_summary_<time>.csv listing every entry of the folder (status ok, skipped, failed "
        "or ignored, reason, output, latency, energy). Existing outputs are skipped unless --overwrite, and the model "
        "is loaded only if something is left to do. Concurrent runs into one --output split the cases; under "
        "torchrun the files are split between ranks. Exit status: 0 no file failed, 1 some files failed, 2 usage or "
        "setup error (bad arguments, not a bundle, --output not writable or full: the run stops, completed outputs "
        "are kept). See docs/inference.md.",
    )
    _add_bundle_arguments(
        infer,
        "folder of images (.nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr)",
        "output folder; must not be inside --input",
        "use the int8 artifact models/model_int8.pt2",
    )
    infer.add_argument("--recursive", action="store_true", help="also process sub-folders (mirrored in --output)")
    infer.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    infer.add_argument("--device", default="cpu", help="torch device (default cpu)")
    infer.set_defaults(handler=_infer)

    explain = commands.add_parser(
        "explain",
        help="predictions with attention maps and saliency, aligned with the input",
        description="For each image: the prediction, SASA attention statistics (attention received, entropy, mean "
        "distance) of the last encoder attention layer and the last attention layer of the first decoder block, and "
        "saliency maps (GradCAM of the predicted structure), as NIfTI files in the "
        "input's geometry and PNG overlays (for 3D, the slice with the most predicted foreground). "
        "Maps come from the fp32 network; --int8 saves the "
        "int8 model's prediction next to them.",
    )
    _add_bundle_arguments(
        explain, "an image file or a folder of images", "output folder", "save the int8 model's prediction"
    )
    explain.add_argument(
        "--methods",
        nargs="*",
        default=["gradcam"],
        choices=["gradcam", "gradcampp", "occlusion"],
        help="saliency methods besides attention (default gradcam)",
    )
    explain.set_defaults(handler=_explain)

    benchmark = commands.add_parser(
        "benchmark",
        help="CNN vs SA, fp32 vs int8: size, parameters, FLOPs, latency, energy, metric",
        description="Train a MONAI CNN baseline and the SA network with the task bundle's own recipe (same data, "
        "transforms, loss, optimiser, epochs and seed), quantise both with quantize_ptq, and measure CNN fp32/int8 and "
        "SA fp32/int8: parameters, stored size, multiply-adds, median latency per case at each thread count, energy "
        "per case (CodeCarbon, method stated) and the validation metric. Writes report.json, report.md and PNG plots "
        "to --output; a rerun reuses trained models with the same settings unless --retrain.",
    )
    benchmark.add_argument("--task", required=True, choices=["cls", "seg2d", "seg3d"])
    benchmark.add_argument("--output", required=True, help="folder for trained runs, report and plots")
    benchmark.add_argument(
        "--dataset_dir", help="Decathlon-style dataset (default: the built-in synthetic one, written to OUTPUT/data)"
    )
    benchmark.add_argument("--epochs", type=int, help="training epochs (default per task: cls 15, seg2d 12, seg3d 10)")
    benchmark.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds; metric as mean ± std (default 0)"
    )
    benchmark.add_argument("--repeats", type=int, default=5, help="timed passes over the cases (default 5)")
    benchmark.add_argument(
        "--min_seconds",
        type=float,
        default=5.0,
        help="time passes for at least this long per model and thread count, for the energy reading (default 5)",
    )
    benchmark.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to time (default 1 2)"
    )
    benchmark.add_argument("--max_cases", type=int, default=4, help="validation cases per timed pass (default 4)")
    benchmark.add_argument(
        "--baseline",
        choices=["matched", "standard"],
        default="matched",
        help="matched: MONAI UNet/ResNet with the SA network's widths and depth (default); "
        "standard: BasicUNet/resnet18",
    )
    benchmark.add_argument(
        "--retrain", action="store_true", help="train again even if a run with the same settings exists"
    )
    benchmark.add_argument(
        "--eager", action="store_true", help="run int8 models without compiling (no C++ compiler, quick runs)"
    )
    benchmark.add_argument(
        "--bundle_dir", help="bundle holding the training recipe (default: this repository's bundle for the task)"
    )
    benchmark.add_argument(
        "--update_readme",
        metavar="README",
        help="replace the task's generated block in this Markdown file: <!-- benchmark:TASK --> (the table), with "
        "--sweep <!-- sweep:TASK --> (the matched-accuracy summary and the front plots)",
    )
    sweep = benchmark.add_argument_group(
        "sweep",
        "--sweep (seg2d, seg3d): every SAUNet preset, MONAI UNet and BasicUNet at three widths, each trained until "
        "validation Dice stops improving (--epochs is then the most), quantised, timed fp32 eager, fp32 compiled and "
        "int8 compiled; writes the accuracy-vs-latency and accuracy-vs-energy fronts, the matched-accuracy table and "
        "an end-to-end timing of `infer` on a clinical-size volume to --output. See docs/benchmarks.md.",
    )
    sweep.add_argument("--sweep", action="store_true", help="run the sweep instead of the CNN-vs-SA table")
    sweep.add_argument("--runs_dir", help="trained runs of the sweep, one folder per model (default OUTPUT/runs)")
    sweep.add_argument(
        "--patience", type=int, default=2, help="validations without improvement before training stops (default 2)"
    )
    sweep.add_argument("--val_interval", type=int, default=1, help="epochs between validations (default 1)")
    sweep.add_argument(
        "--tolerance",
        type=float,
        default=0.005,
        help="matched accuracy: SA int8 Dice at least the CNN's minus this (default 0.005)",
    )
    sweep.add_argument(
        "--volume_shape",
        type=int,
        nargs="+",
        help="end-to-end volume size at 1 mm (default 256 256 128 in 3D, 512 512 in 2D)",
    )
    sweep.add_argument("--no_end_to_end", action="store_true", help="skip the end-to-end timing")
    sweep.add_argument(
        "--retime", action="store_true", help="time again even where a timing of the same model file exists"
    )
    benchmark.set_defaults(handler=_benchmark)

    dataset = commands.add_parser("dataset", help="write a built-in synthetic dataset (Decathlon layout, NIfTI)")
    dataset.add_argument("--task", required=True, choices=["seg2d", "seg3d", "cls"])
    dataset.add_argument("--output", required=True, help="new folder to write")
    dataset.add_argument("--seed", type=int, default=0)
    dataset.set_defaults(handler=_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

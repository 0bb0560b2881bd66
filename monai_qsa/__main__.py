"""Command line: ``python -m monai_qsa {infer,explain,dataset} ...`` (also installed as ``monai-qsa``)."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _infer(args: argparse.Namespace) -> int:
    from monai_qsa.inference.batch import run_batch_inference

    return run_batch_inference(args.bundle, args.input, args.output, int8=args.int8, recursive=args.recursive, overwrite=args.overwrite, device=args.device)


def _explain(args: argparse.Namespace) -> int:
    from monai_qsa.visualize import explain

    return explain(args.bundle, args.input, args.output, int8=args.int8, methods=tuple(args.methods))


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
        "each run writes inference_summary_<time>.csv (status, reason, output, latency, energy per file). Existing "
        "outputs are skipped unless --overwrite. Exit status 1 if any file failed. Under torchrun the files are "
        "split between ranks.",
    )
    _add_bundle_arguments(
        infer, "folder of images (.nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr)", "output folder; must not be inside --input",
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
        "distance) of the last encoder and first decoder attention layers, and saliency maps, as NIfTI files in the "
        "input's geometry and PNG overlays (middle slice for 3D). Maps come from the fp32 network; --int8 saves the "
        "int8 model's prediction next to them.",
    )
    _add_bundle_arguments(explain, "an image file or a folder of images", "output folder", "save the int8 model's prediction")
    explain.add_argument("--methods", nargs="*", default=["gradcam"], choices=["gradcam", "gradcampp", "occlusion"], help="saliency methods besides attention (default gradcam)")
    explain.set_defaults(handler=_explain)

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

"""Hand a run to the rest of the ecosystem: a Hugging Face transformers folder or an ONNX file.

python -m pretrain.export RUN_OR_CHECKPOINT --format hf|onnx OUT writes the newest checkpoint of a run
(or the given checkpoint) to OUT and prints what it wrote.

hf: ``models.convert.to_hf``. A fine-tuned model (head 'linear') becomes ViTForImageClassification,
labelled with the classes of the run's training manifest; a pre-training model becomes ViTModel (its
pre-logits are the pooler; HF has no place for its classifier).
onnx: the whole model, head included: input ``pixel_values`` (B, 3, H, W) float32 normalised images
(mean 0.5, std 0.5), output ``logits`` (B, classes), B dynamic.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import torch

from . import checkpoint
from .config import Config
from .data import shards
from .cli import OneLineParser, command, finish
from .errors import UserError
from .models.convert import to_hf
from .models.convert_hf import preprocessor_config
from .models.hybrid import fold_weight_standardisation
from .models.vit import VisionTransformer

log = logging.getLogger(__name__)

ONNX_OPSET = 17
HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def class_names(config: Config, num_classes: int) -> dict[int, str] | None:
    """id2label from the classes of the run's training manifest; None (HF's LABEL_i) with a warning when
    they cannot be read or do not match the model."""
    try:
        classes = shards.resolve(config.data.train).classes
    except UserError as e:
        log.warning("the labels will be LABEL_i: %s", e)
        return None
    if classes is None or len(classes) != num_classes:
        log.warning("the labels will be LABEL_i: %s names no %d classes", config.data.train, num_classes)
        return None
    return dict(enumerate(classes))


def export_hf(model: VisionTransformer, config: Config, out: Path) -> str:
    """Write a transformers folder; a line saying what it holds."""
    labelled = model.head_type == "linear" and model.num_classes > 0
    multi_label = config.loss.kind == "sigmoid"
    to_hf(model, out, class_names(config, model.num_classes) if labelled else None, multi_label)
    kind = "ViTModel (a feature extractor: a pipeline on it would classify at random)"
    if model.head_type == "prelogits":
        kind = "ViTModel (a feature extractor: pooler_output is the pre-logits; a pipeline would classify at random)"
    if labelled:
        kind = f"ViTForImageClassification ({model.num_classes} classes{', multi-label' if multi_label else ''})"
    return f"wrote {kind} to {out}/: {', '.join(HF_FILES)}"


def export_onnx(model: VisionTransformer, config: Config, out: Path) -> str:
    """Write an ONNX file, checked with onnx.checker; a line saying what it holds.

    Its metadata says how to use it: ``preprocessor`` (HF's image-processor fields, as in the hf export),
    ``problem_type`` (multi-label: a sigmoid per class; single-label: softmax) and, where the training manifest
    names them, ``id2label``."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package; pip install onnx") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, model.image_size, model.image_size)
    with warnings.catch_warnings():
        # The TorchScript-based exporter: the dynamo one needs onnxscript, which is not a dependency. Its
        # deprecation notice and the tracer's notes on the (static) token-grid check are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The hybrid's 'SAME' padding: F.pad reverses its pads with a step -1 slice, computed at run time instead.
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1 can be constant folded")
        torch.onnx.export(fold_weight_standardisation(model).eval(), (example,), str(out), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    metadata = {"preprocessor": json.dumps(preprocessor_config(model))}
    if model.num_classes:
        multi_label = config.loss.kind == "sigmoid"
        metadata["problem_type"] = "multi_label_classification" if multi_label else "single_label_classification"
        if (labels := class_names(config, model.num_classes)) is not None:
            metadata["id2label"] = json.dumps({str(i): name for i, name in labels.items()})
    proto = onnx.load(str(out), load_external_data=False)  # weights over 2 GB stay in their external file
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out), full_check=True)  # a path, so that models over 2 GB are checked too
    outputs = model.num_classes or model.size.width
    return (f"wrote {out} (opset {ONNX_OPSET}, {out.stat().st_size / 1e6:.1f} MB): pixel_values "
            f"(batch, 3, {model.image_size}, {model.image_size}) -> logits (batch, {outputs}); its metadata holds "
            f"{', '.join(metadata)}")


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--format", required=True, choices=("hf", "onnx"),
                        help="hf: a transformers folder; onnx: one file")
    parser.add_argument("out", metavar="OUT", help="the folder (hf) or file (onnx) to write, on this machine")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT file, or write into a folder that is not empty")
    args = parser.parse_args(argv)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", args.out):
        raise UserError(f"export writes to this machine's disk, not to {args.out}; write it here, then copy it there "
                        f"(gcloud storage cp --recursive, aws s3 cp --recursive)")
    args.out = Path(args.out)
    folder = args.out if args.format == "hf" else args.out.parent
    if folder.is_dir() and ((folder / checkpoint.STATE).exists() or any(folder.glob(f"*/{checkpoint.STATE}"))
                            or (folder / "checkpoints").is_dir() and args.format == "hf"):
        raise UserError(f"{folder} holds a run's checkpoints, which export would overwrite; give a "
                        f"{'folder' if args.format == 'hf' else 'path'} of its own")
    if args.format == "hf" and args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out} is a file; --format hf writes a folder, so give a folder's path")
    if args.format == "onnx" and args.out.is_dir():
        raise UserError(f"{args.out} is a folder; --format onnx writes one file, e.g. {args.out / 'model.onnx'}")
    above = next(parent for parent in args.out.absolute().parents if parent.exists())
    if not above.is_dir():
        raise UserError(f"{args.out} cannot be written: {above} is a file, not a folder; give a path in a folder")
    occupied = args.out.is_file() or (args.out.is_dir() and any(args.out.iterdir()))
    if occupied and not args.overwrite:
        what = "exists" if args.out.is_file() else "is a folder that is not empty"
        raise UserError(f"{args.out} {what}; give a new path, or pass --overwrite to replace what export writes there")
    model, config, found = checkpoint.load_checkpoint(args.run)
    wrote = export_hf(model, config, args.out) if args.format == "hf" else export_onnx(model, config, args.out)
    print(f"from {found}: {wrote}")
    return 0


if __name__ == "__main__":
    finish(main())

"""python -m pretrain.consolidate CHECKPOINT_OR_RUN_DIR

Writes model.safetensors (full fp32 weights, our parameter names) into a DeepSpeed checkpoint folder, by default
the run's newest, from the ZeRO shards of every rank. ZeRO-3 checkpoints need this before fine-tuning, evaluation
or export; lower stages write model.safetensors while training.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import checkpoint
from .cli import OneLineParser, command, finish
from .errors import UserError
from .weights_file import readable_as_its_folder


def consolidate(path: str | Path) -> Path:
    """The checkpoint's model.safetensors, written (atomically) unless it is there already."""
    found = checkpoint.find_given(path)
    target = found / "model.safetensors"
    if target.is_file():  # ZeRO stages 0-2 and the other backends write it while training
        return target
    from .backends.deepspeed_backend import TAG  # imports deepspeed, or says how to install it

    if not (found / TAG).is_dir():
        raise UserError(f"checkpoint {found} has neither model.safetensors nor the DeepSpeed shards ({TAG}/) to "
                        f"write it from; consolidate another checkpoint of the run")
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory(dir=found, prefix=".consolidate-") as tmp:
        try:
            convert_zero_checkpoint_to_fp32_state_dict(str(found), tmp, max_shard_size=None, safe_serialization=True,
                                                       tag=TAG)
        except Exception as e:  # noqa: BLE001 (DeepSpeed's reader raises what its parts raise)
            if checkpoint.is_damage(e):
                raise checkpoint.damaged(found, e, None) from None
            raise
        os.replace(Path(tmp) / target.name, target)
    readable_as_its_folder(target)
    return target


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pretrain.consolidate", description=__doc__.split("\n\n")[1])
    parser.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="a checkpoints/step_* folder, or a run directory (its newest checkpoint)")
    args = parser.parse_args(argv)
    print(f"full weights: {consolidate(args.path)}")
    return 0


if __name__ == "__main__":
    finish(main())

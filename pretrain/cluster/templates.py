"""The templates in the repository's slurm/ and k8s/ folders, filled in with Jinja2.

Every placeholder must receive a value (StrictUndefined): a template never renders with a hole.
The filter ``sh`` quotes a value for the shell (``{{ path | sh }}``).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jinja2

from ..errors import UserError

ROOT = Path(__file__).resolve().parents[2]

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROOT)), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_env.filters["sh"] = lambda value: shlex.quote(str(value))  # a word for the shell, quoted where needed
_env.filters["yaml"] = lambda value: json.dumps(str(value))  # a YAML string whatever it holds (# or ': ' too)


def source(name: str) -> str:
    """A template file's text as it is (e.g. k8s/launch.sh, shipped inside a ConfigMap)."""
    path = ROOT / name
    if not path.is_file():
        raise UserError(f"the job template {path} is missing; run pretrain.submit from a checkout of the repository")
    return path.read_text()


def render(name: str, values: dict[str, Any]) -> str:
    """The template ``name`` (relative to the repository, e.g. slurm/train.sbatch) filled with ``values``."""
    source(name)
    try:
        return _env.get_template(name).render(**values)
    except jinja2.UndefinedError as e:
        raise TypeError(f"{name}: {e.message}") from None

"""Loading recipes: YAML files with ``base:`` inheritance and ``key.sub=value`` overrides.

Every value is checked against the dataclasses of ``pretrain.config`` where it is written, so an
error names the file (or the command line), the key and, for a typo, the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .config import Config
from .errors import RecipeError

COMMAND_LINE = "command line"
SPELLINGS = {"bfloat16": "bf16", "float32": "fp32", "fp8": "float8"}  # torch's names of the precisions, for a hint
NULLS = ("null", "~")  # YAML's null: for a text setting that may be empty, empty (data.val=null: no validation set)


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """The recipe at ``path`` with its bases resolved and ``overrides`` (``key=value``) applied."""
    values = _load_chain(Path(path), ())
    for item in overrides:  # the last of a key given twice wins, so a script can add to a command's overrides
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"command line: override '{item}' is not of the form key=value (e.g. optim.lr=3e-4)")
        if key.strip() == "base":
            raise RecipeError(f"command line: base: belongs in a recipe file; give {text or 'the base recipe'} as the "
                              f"recipe, or write one with base: {text or 'FILE'} and your changes")
        field_type = _field_type(key.strip(), COMMAND_LINE)
        value = text if field_type is str and text not in NULLS else _parse_yaml(text, COMMAND_LINE)
        _check({key.strip(): value}, Config, COMMAND_LINE)
        _set_dotted(values, key.strip(), value)
    return check_together(_build(Config, values), f"{path}{' with the overrides' if overrides else ''}")


def from_dict(values: dict[str, Any], source: str) -> Config:
    """A Config from plain data (e.g. a checkpoint's saved recipe), checked like a recipe file."""
    values = _expand(values)
    _check(values, Config, source)
    return _build(Config, values)  # not check_together: a saved run's recipe is read as it was, to evaluate it


def check_together(config: Config, source: str) -> Config:
    """Settings that each are in range but contradict each other, in a recipe about to run."""
    if config.data.batch_size % config.optim.grad_accum:
        raise RecipeError(f"{source}: data.batch_size {config.data.batch_size} does not divide into "
                          f"optim.grad_accum {config.optim.grad_accum} micro-batches; make it a multiple of "
                          f"{config.optim.grad_accum}")
    if config.schedule.final_lr > config.optim.lr:
        raise RecipeError(f"{source}: schedule.final_lr {config.schedule.final_lr} is above optim.lr {config.optim.lr}, "
                          f"the peak the schedule decays from; lower schedule.final_lr")
    if "://" in config.run_dir:
        raise RecipeError(f"{source}: run_dir {config.run_dir} is a URL, and checkpoints are made atomic by renames in "
                          f"a file system; give a folder: a local one, or the bucket mounted (gcsfuse, Filestore)")
    if config.init_from and config.stage != "finetune":
        raise RecipeError(f"{source}: init_from={config.init_from} is read by stage: finetune only (its encoder, new "
                          f"heads); set stage=finetune, or to continue a pre-training run set "
                          f"checkpoint.resume={config.init_from}")
    if config.log.fewshot_every and config.backend == "deepspeed" and config.deepspeed.zero_stage == 3:
        raise RecipeError(f"{source}: log.fewshot_every probes the model on rank 0 alone, which ZeRO-3 shards over all "
                          f"ranks; set log.fewshot_every=0 and probe a consolidated checkpoint with python -m "
                          f"pretrain.evaluate --fewshot-train")
    if config.log.fewshot_every and not (config.data.fewshot_val or config.data.val):
        raise RecipeError(f"{source}: log.fewshot_every needs a few-shot test set; set data.fewshot_val (or data.val) "
                          f"to shards, or log.fewshot_every=0")
    return config


def warnings(config: Config) -> list[str]:
    """What is allowed but likely not meant; said at the start of a run and by --dry-run."""
    schedule = config.schedule
    if schedule.warmup_steps >= schedule.total_steps:
        return [f"schedule.warmup_steps {schedule.warmup_steps} is not below schedule.total_steps "
                f"{schedule.total_steps}: the run is all warm-up, its learning rate never decays and reaches optim.lr "
                f"{'at the last step only' if schedule.warmup_steps == schedule.total_steps else 'at no step'}; "
                f"lower the warm-up"]
    return []


def to_dict(config: Config) -> dict[str, Any]:
    """Plain data (tuples as lists) for YAML and JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    return plain(dataclasses.asdict(config))


def changes(before: Config, after: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (before, after)} of the settings that differ."""

    def flat(values: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in values.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
        return out

    a, b = flat(to_dict(before)), flat(to_dict(after))
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


DATA_KEYS = ("train", "val", "fewshot_train", "fewshot_val")  # the data.* keys that name shard sets


def anchor_paths(config: Config) -> None:
    """Local data paths and init_from made absolute (from the current directory), so that the config.yaml and
    checkpoints of a run name what evaluate, resume and the few-shot probe find from any directory. URLs stay."""
    for owner, key in [*((config.data, k) for k in DATA_KEYS), (config, "init_from")]:
        value = getattr(owner, key)
        if value and "://" not in value:
            setattr(owner, key, os.path.abspath(value))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save(config: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(config))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, documentation) for every field, sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            rows.append((key, _type_name(tp), _inline_yaml(f.default), f.metadata.get("doc", "")))
    return rows


def _inline_yaml(value: Any) -> str:
    """A default as a recipe would write it: [0.9, 0.999], true, 1.0e-06, ''."""
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True, width=1000)
    return text.strip().removesuffix("...").strip()


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve() if path.exists() else path
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"{seen[-1]}: the base: chain loops ({chain}); remove one of the base: lines")
    if not path.is_file():
        if seen:
            what = "is a folder" if path.is_dir() else "does not exist"
            raise RecipeError(
                f"{seen[-1]}: base recipe '{path}' {what}; fix the base: line "
                f"(it is the path of a YAML file, relative to the recipe that names it)"
            )
        if path.is_dir():
            yamls = sorted(p.name for p in path.glob("*.yaml"))
            listing = f" (it holds {', '.join(yamls[:6])}{', ...' if len(yamls) > 6 else ''})" if yamls else ""
            raise RecipeError(f"recipe '{path}' is a folder{listing}; pass one YAML file, such as recipes/demo.yaml")
        if "=" in path.name:
            raise RecipeError(f"'{path}' is an override where the recipe goes; the recipe comes first: python -m "
                              f"pretrain.run RECIPE key=value ...")
        raise RecipeError(f"recipe '{path}' does not exist; pass the path of a YAML file such as recipes/demo.yaml")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise RecipeError(f"recipe '{path}' is not a text file (not UTF-8); pass the path of a YAML file such as "
                          f"recipes/demo.yaml") from None
    values = _parse_yaml(text, str(path)) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values, not a {type(values).__name__}")
    twice = _given_twice(values)
    if twice:
        raise RecipeError(f"{path}: {twice} is given twice (nested and as a dotted key); keep one")
    values = _expand(values)
    if "base" in values and values["base"] is None:
        raise RecipeError(f"{path}: base: names no recipe; give the path of one (base: demo.yaml) or remove the line")
    base = values.pop("base", None)
    _check(values, Config, str(path))
    if base is None:
        return values
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: must be the path of another recipe, got {base!r}")
    merged = _load_chain(path.parent / base, (*seen, path))
    _merge(merged, values)
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """A key given twice in one mapping is an error: YAML's own rule, which PyYAML does not enforce (the last one
    silently wins)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"'{key}' is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise RecipeError(f"{source}: not valid YAML{line} ({getattr(e, 'problem', e)})") from None


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _given_twice(values: dict[str, Any], prefix: str = "", seen: set | None = None) -> str:
    """The first setting a mapping gives twice, one way nested and one way dotted (optim: {lr: ..} and optim.lr)."""
    seen = set() if seen is None else seen
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            found = _given_twice(v, f"{key}.", seen)
            if found:
                return found
        elif key in seen:
            return key
        seen.add(key)
    return ""


def _expand(values: dict[str, Any]) -> dict[str, Any]:
    """Nest dotted keys: {'optim.lr': 1} -> {'optim': {'lr': 1}}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        _set_dotted(out, str(k), _expand(v) if isinstance(v, dict) else v)
    return out


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(values.get(p), dict):
            values[p] = {}
        values = values[p]
    if isinstance(value, dict) and isinstance(values.get(leaf), dict):
        _merge(values[leaf], value)
    else:
        values[leaf] = value


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    return [row[0] for row in describe(cls, prefix)]


ELSEWHERE = {  # keys of other trainers (timm, big_vision, torchtitan) and where their settings live here
    "patch_size": "the patch size is part of model.name (vit_b16: 16)",
    "epochs": "schedule.total_steps counts steps (epochs x samples / data.batch_size)",
    "warmup_epochs": "schedule.warmup_steps counts steps (epochs x samples / data.batch_size)",
    "img_size": "its name here is model.image_size",
    "drop_path_rate": "this trainer has no stochastic depth: the ViT paper's recipes use model.dropout",
}


def _suggest(key: str) -> str:
    keys = _all_keys()
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ELSEWHERE:
        return f"; {ELSEWHERE[leaf]}"
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, keys, n=1, cutoff=0.6) or [
        k for k in keys if k.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1)
    ]
    if close:
        return f"; did you mean '{close[0]}'?"
    return "; run python -m pretrain.run --help-recipe for the valid keys"


def _field_type(key: str, source: str) -> Any:
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise RecipeError(f"{source}: unknown key '{key}'{_suggest(key)}")
        cls = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise RecipeError(f"{source}: '{'.'.join(parts[: i + 1])}' has no sub-keys; unknown key '{key}'")
    return cls


def _check(values: dict[str, Any], cls: type, source: str, prefix: str = "") -> None:
    """Raise RecipeError for the first unknown key or ill-typed value (dotted keys allowed)."""
    for key, value in values.items():
        full = prefix + str(key)
        tp = _field_type(full, source)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: '{full}' is a section of keys (e.g. {_all_keys(tp, full + '.')[0]}), not {value!r}")
            _check(value, tp, source, full + ".")
        elif not (value is None and _optional_text(full)):
            if value == "" and not _optional_text(full):  # run_dir= would write into the current folder
                raise RecipeError(f"{source}: '{full}' is empty; give it a value, or leave it out for its default")
            _in_range(_coerce(value, tp, full, source), full, source)


def _optional_text(key: str) -> bool:
    """A text setting whose default is empty (data.val, init_from): null there means empty. Elsewhere (run_dir,
    checkpoint.resume) null is an error, not an empty path that would mean the current folder."""
    *path, name = key.split(".")
    cls: Any = Config
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return next(f for f in dataclasses.fields(cls) if f.name == name).default == ""


def _in_range(value: Any, key: str, source: str) -> None:
    *path, name = key.split(".")
    cls: Any = Config
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    meta = next(f for f in dataclasses.fields(cls) if f.name == name).metadata
    (low, high), (above, below) = meta.get("range", (None, None)), meta.get("open", (None, None))
    for v in value if isinstance(value, tuple) else (value,):
        if (low is not None and v < low) or (high is not None and v > high) or (above is not None and v <= above) \
                or (below is not None and v >= below):
            raise RecipeError(f"{source}: '{key}' must be {_range_words(low, high, above, below)}, got "
                              f"{_inline_yaml(value)}")


def _range_words(low: float | None, high: float | None, above: float | None, below: float | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    floor = f"at least {low}" if low is not None else f"above {above}" if above is not None else ""
    ceiling = f"at most {high}" if high is not None else f"below {below}" if below is not None else ""
    return " and ".join(part for part in (floor, ceiling) if part)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    def bad(expected: str) -> RecipeError:
        return RecipeError(f"{source}: '{key}' must be {expected}, got {'an empty value' if value is None else repr(value)}")

    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value not in choices:
            said = [str(c) for c in choices]
            if str(value) in said:  # '2' for 2: a quoted number
                hint = f" (write it without quotes: {key}={value})"
            else:
                spelled = SPELLINGS.get(str(value).lower(), str(value).lower())
                near = difflib.get_close_matches(spelled, [c.lower() for c in said], n=1)
                hint = f" (did you mean '{said[[c.lower() for c in said].index(near[0])]}'?)" if near else ""
            raise RecipeError(f"{source}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}{hint}")
        return value
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} values like [{', '.join(_type_name(a) for a in args)}]")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, (str, float)) and not isinstance(value, bool):  # 1e4 (YAML reads a string) or 1.0e+4
            try:
                number = float(value)
            except ValueError:
                raise bad("an integer") from None
            if number.is_integer():
                return int(number)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(number):  # every range check passes a NaN
            raise bad("a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string" if value is None else "a string (quote it)")  # 123, true: YAML's other types
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")


def _build(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp = hints[f.name]
        v = "" if values[f.name] is None and f.default == "" else values[f.name]  # null: see _optional_text
        kwargs[f.name] = _build(tp, v) if dataclasses.is_dataclass(tp) else _coerce(v, tp, f.name, "recipe")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(map(str, get_args(tp)))
    if get_origin(tp) is tuple:
        return "[" + ", ".join(_type_name(a) for a in get_args(tp)) + "]"
    return getattr(tp, "__name__", str(tp))

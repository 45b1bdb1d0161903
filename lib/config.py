"""Experiment configuration: defaults, ``_base_`` inheritance, command-line overrides, validation.

Every run is described by one resolved config. It is checked completely before any data or model is
touched, so a typo or an impossible value fails in a second with a message that names the file or
key, instead of after an epoch of training (or silently, as a key nobody reads).
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from easydict import EasyDict

from models.backbones import BACKBONES, named_schedule

__all__ = ["DEFAULTS", "ConfigError", "load_config", "validate_config", "save_config", "config_to_dict"]

# The schema: every key that exists, with its default. Types are derived from these values; the keys
# whose default cannot describe them (nullable, unions) are listed in _NULLABLE and _SCHEDULE_KEY.
DEFAULTS: dict[str, Any] = {
    "experiment": "",            # "" -> derived from the config path
    "output_dir": "logs",
    "seed": 0,
    "model": {
        "name": "vit_base_patch16_224_in21k",
        "pretrained": "",        # checkpoint path; "" = random init (demo / tests)
        "img_size": 224,
        "global_pool": "",       # "" = the backbone's own (class token; MAE: avg), or "token" / "avg"
        "embed_dim": 768,        # embed_dim / depth / num_heads / patch_size: custom "vit" only
        "depth": 12,
        "num_heads": 12,
        "patch_size": 16,
        "drop_path_rate": 0.1,
    },
    "peft": {
        "type": "lora",
        "dim": None,             # None = the backbone's default width
        "dropout": 0.1,
        "init": "official",
    },
    "merging": {
        "r": None,               # None | "low" | "high" | int | [int, float] | per-layer list of ints
        "pyra": False,
        "prop_attn": True,
    },
    "data": {
        "root": "data/vtab-1k",
        "task": "cifar",
        "train_split": "train800val200",
        "eval_split": "test",
        "normalization": "imagenet",
        "num_classes": None,     # None = read from the dataset
        "augment": "",
        "num_workers": 4,
        "skip_bad_images": False,
    },
    "optim": {
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "eps": 1e-8,
        "betas": [0.9, 0.999],
        "pyra_lr": 1e-4,
        "pyra_weight_decay": 1e-4,
        "clip_grad": None,
    },
    "sched": {
        "warmup_epochs": 10,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
    },
    "train": {
        "epochs": 100,
        "batch_size": 32,
        "eval_batch_size": 128,
        "eval_interval": 10,
        "precision": "fp32",
        "drop_last": False,
        "device": "auto",
    },
    "report": {
        "benchmark_batch": 64,
        "benchmark_seconds": 2.0,
        "flops": True,
        "speedup": False,        # time merged vs unmerged inference at the end of training (opt-in)
    },
}

_NULLABLE: dict[str, type] = {"peft.dim": int, "data.num_classes": int, "optim.clip_grad": float}
_SCHEDULE_KEY = "merging.r"     # union type, checked by _schedule_errors
_ENUMS: dict[str, tuple[str, ...]] = {
    "peft.type": ("lora", "adapter", "none", "full"),
    "peft.init": ("official", "standard"),
    "data.normalization": ("imagenet", "inception"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "model.global_pool": ("", "token", "avg"),
}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_RUNTIME_KEYS = ("config_path",)  # set by load_config only; never read from files or overrides
_BASE = "_base_"


class ConfigError(ValueError):
    """A config problem; the message names the file and/or dotted key and what was expected."""

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            super().__init__(self.errors[0])
        else:
            super().__init__(f"{len(self.errors)} config errors:\n  - " + "\n  - ".join(self.errors))


# ----------------------------------------------------------------------------------------- schema tables
def _walk(tree: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every key of a nested mapping, sections before their children."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        yield dotted, value
        if isinstance(value, Mapping):
            yield from _walk(value, dotted + ".")


_ALL_KEYS: list[str] = [k for k, _ in _walk(DEFAULTS)]
_SECTIONS: set[str] = {k for k, v in _walk(DEFAULTS) if isinstance(v, Mapping)}
_LEAF_DEFAULTS: dict[str, Any] = {k: v for k, v in _walk(DEFAULTS) if not isinstance(v, Mapping)}


def _leaf_type(key: str) -> type | None:
    """The Python type of a leaf (list for list keys); None for the merging-schedule union."""
    if key == _SCHEDULE_KEY:
        return None
    if key in _NULLABLE:
        return _NULLABLE[key]
    return type(_LEAF_DEFAULTS[key])


def _leaf_type_of_list(key: str) -> type:
    """Element type of a list key (all list defaults are non-empty and homogeneous)."""
    return type(_LEAF_DEFAULTS[key][0])


def _suggest(key: str) -> str:
    """' did you mean X?' for the nearest valid key (same leaf name elsewhere, else closest spelling)."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in _ALL_KEYS if k.rsplit(".", 1)[-1] == leaf and k != key]
    match = same_leaf or difflib.get_close_matches(key, _ALL_KEYS, n=1, cutoff=0.6)
    if not match:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in _ALL_KEYS}
        match = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    return f"; did you mean {match[0]}?" if match else ""


# ---------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and no duplicate keys.

    PyYAML follows YAML 1.1: ``1e-4`` is a *string* and ``no``/``on`` are booleans. Both are classic
    config bugs (a learning rate that fails type checks, a task called "no" turning into False).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                   |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings with inline lists, so a saved r schedule stays on one line."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def _parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; syntax errors name the source and line."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        where = ""  # an unclosed bracket fails at the end of the file; say where it was opened
        if e.context and e.context_mark is not None and e.context_mark is not mark:
            where = f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{source}{line}: invalid YAML: {e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


# ------------------------------------------------------------------------------------- structure checks
def _type_name(key: str) -> str:
    """What a key expects, in words, for error messages."""
    if key in _SECTIONS:
        return "a mapping"
    kind = _leaf_type(key)
    name = {bool: "bool", int: "int", float: "float (or int)", str: "str"}.get(kind, "")
    if kind is list:
        elem = _leaf_type_of_list(key)
        name = f"a list of {elem.__name__}"
    return f"{name} or null" if key in _NULLABLE else name


def _is(value: Any, kind: type) -> bool:
    """isinstance with config semantics: ints count as floats, bools count as neither."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _type_errors(key: str, value: Any) -> list[str]:
    if key == _SCHEDULE_KEY:
        return []  # union type: checked with its values in _schedule_errors
    kind = _leaf_type(key)
    if value is None:
        ok = key in _NULLABLE
    elif kind is list:
        ok = isinstance(value, (list, tuple)) and all(_is(v, _leaf_type_of_list(key)) for v in value)
    else:
        ok = _is(value, kind)
    return [] if ok else [f"{key}: expected {_type_name(key)}, got {value!r}"]


def _structure_errors(tree: Any, where: str | None, prefix: str = "", complete: bool = False) -> list[str]:
    """Unknown keys, sections that are not mappings, wrong leaf types (and missing keys if ``complete``)."""
    at = f"{where}: " if where else ""
    if not isinstance(tree, Mapping):
        return [f"{at}{prefix.rstrip('.') or 'config'}: expected a mapping, got {tree!r}"]
    errors = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted not in _SECTIONS and dotted not in _LEAF_DEFAULTS:
            if not (complete and dotted in _RUNTIME_KEYS):
                errors.append(f"{at}unknown key {dotted!r}{_suggest(dotted)}")
        elif dotted in _SECTIONS:
            errors += _structure_errors(value, where, dotted + ".", complete)
        else:
            errors += [at + e for e in _type_errors(dotted, value)]
    if complete:
        section = DEFAULTS if not prefix else _get(DEFAULTS, prefix.rstrip("."))
        errors += [f"missing key {prefix + k!r}" for k in section if k not in tree]
        if not prefix and not isinstance(tree.get("config_path", ""), str):
            errors.append(f"config_path: expected str, got {tree['config_path']!r}")
    return errors


def _get(tree: Mapping, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------------------- value checks
def _schedule_errors(cfg: Mapping) -> list[str]:
    """merging.r: its type, its values, its length against the backbone depth, and PYRA needing it."""
    r, name, pyra = cfg["merging"]["r"], cfg["model"]["name"], cfg["merging"]["pyra"]
    depth = BACKBONES[name].depth if name in BACKBONES else cfg["model"]["depth"] if name == "vit" else None
    depth = depth if depth is not None and depth >= 1 else None  # unknown: reported elsewhere
    key = _SCHEDULE_KEY
    per_layer: list[int] = []
    if r is None:
        pass
    elif isinstance(r, str):
        if r not in ("low", "high"):
            return [f"{key}: expected 'low' or 'high' for a named schedule, got {r!r}"]
        per_layer = [1]  # a named schedule merges, whatever the depth turns out to be
        if depth is not None:
            try:
                per_layer = named_schedule(r, name, depth)
            except ValueError as e:
                return [f"{key}: {e}"]
    elif _is(r, int):
        if r < 0:
            return [f"{key}: tokens merged per layer must be >= 0, got {r}"]
        per_layer = [r]
    elif isinstance(r, (list, tuple)) and all(_is(v, int) for v in r):
        if any(v < 0 for v in r):
            return [f"{key}: tokens merged per layer must be >= 0, got {list(r)}"]
        if depth is not None and len(r) > depth:
            return [f"{key}: per-layer list has {len(r)} entries but {name!r} has depth {depth}"]
        per_layer = list(r)
    elif isinstance(r, (list, tuple)) and len(r) == 2 and _is(r[0], int) and _is(r[1], float):
        if r[0] < 0 or not 0.0 <= r[1] <= 1.0:
            return [f"{key}: an (r, inflection) pair needs r >= 0 and inflection in [0, 1], got {list(r)}"]
        per_layer = [r[0]]
    else:
        return [f"{key}: expected null, 'low', 'high', an int, an [int, float in [0, 1]] (r, inflection) pair "
                f"or a per-layer list of ints, got {r!r}"]
    if pyra is True and not any(per_layer):
        return [f"merging.pyra: PYRA needs token merging, but merging.r is {r!r} (no token is merged); "
                "set merging.r (e.g. low/high) or merging.pyra: false"]
    return []


def _bound(cfg: Mapping, key: str, low: float, *, strict: bool = False, high: float | None = None) -> list[str]:
    """`key` >= low (> low if strict) and < high; tested positively, so NaN fails too."""
    value = _get(cfg, key)
    if value is None:
        return []
    ok = value > low if strict else value >= low
    if high is not None:
        ok = ok and value < high
    if ok:
        return []
    rng = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
    return [f"{key}: must be {rng}, got {value!r}"]


def _value_errors(cfg: Mapping) -> list[str]:
    errors = []
    for key, allowed in _ENUMS.items():
        if _get(cfg, key) not in allowed:
            errors.append(f"{key}: expected one of {', '.join(allowed)}; got {_get(cfg, key)!r}")
    if not _DEVICE.fullmatch(cfg["train"]["device"]):
        errors.append(f"train.device: expected auto, cpu, cuda or cuda:N; got {cfg['train']['device']!r}")
    for key in ("output_dir", "data.root", "data.task", "data.train_split", "data.eval_split"):
        if not _get(cfg, key):
            errors.append(f"{key}: must not be empty")

    model, name = cfg["model"], cfg["model"]["name"]
    if name != "vit" and name not in BACKBONES:
        errors.append(f"model.name: unknown backbone {name!r}; expected one of: {', '.join(sorted(BACKBONES))}, "
                      "or 'vit' (custom sizes from model.embed_dim/depth/num_heads/patch_size)")
    positive = ["model.img_size", "model.patch_size", "train.epochs", "train.batch_size", "train.eval_batch_size",
                "train.eval_interval", "report.benchmark_batch", "peft.dim", "data.num_classes"]
    if name == "vit":
        positive += ["model.embed_dim", "model.depth", "model.num_heads"]
    for key in positive:
        errors += _bound(cfg, key, 1)
    for key in ("seed", "data.num_workers", "sched.warmup_epochs", "optim.lr", "optim.weight_decay", "optim.pyra_lr",
                "optim.pyra_weight_decay", "sched.warmup_lr", "sched.min_lr"):
        errors += _bound(cfg, key, 0)
    for key in ("optim.eps", "optim.clip_grad", "report.benchmark_seconds"):
        errors += _bound(cfg, key, 0, strict=True)
    for key in ("model.drop_path_rate", "peft.dropout"):
        errors += _bound(cfg, key, 0, high=1)
    betas = cfg["optim"]["betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        errors.append(f"optim.betas: expected 2 floats in [0, 1), got {list(betas)}")
    if cfg["sched"]["warmup_epochs"] > cfg["train"]["epochs"]:
        errors.append(f"sched.warmup_epochs: {cfg['sched']['warmup_epochs']} is more than train.epochs "
                      f"({cfg['train']['epochs']})")

    patch = model["patch_size"]
    if name in BACKBONES:
        found = re.search(r"patch(\d+)", BACKBONES[name].timm_name)
        patch = int(found.group(1)) if found else patch
    if patch >= 1 and model["img_size"] % patch:
        errors.append(f"model.img_size: {model['img_size']} is not divisible by the patch size {patch}")
    if name == "vit" and model["num_heads"] >= 1 and model["embed_dim"] % model["num_heads"]:
        errors.append(f"model.embed_dim: {model['embed_dim']} is not divisible by model.num_heads "
                      f"({model['num_heads']})")
    return errors + _schedule_errors(cfg)


def validate_config(cfg: Mapping) -> None:
    """Check keys, types and values of a complete config; raise ConfigError listing every problem."""
    errors = _structure_errors(cfg, None, complete=True)
    if not errors:
        errors = _value_errors(cfg)
    if errors:
        raise ConfigError(errors)


# ------------------------------------------------------------------------------------ files and merging
def _deep_merge(base: Mapping, over: Mapping) -> dict:
    """`over` on top of `base`: mappings merge recursively, everything else (lists too) replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_file(path: Path, included_from: Path | None) -> dict:
    if not path.is_file():
        by = f" (listed in _base_ of {included_from})" if included_from else ""
        raise ConfigError(f"{path}: config file not found{by}")
    data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def _resolve_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A file's settings merged over its `_base_` files (in order, later wins), recursively."""
    path = Path(os.path.normpath(path.absolute()))
    if path in chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(map(str, chain + (path,)))}")
    data = _read_file(path, chain[-1] if chain else None)
    bases = data.pop(_BASE, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths relative to this file, got {bases!r}")
    errors = _structure_errors(data, str(path))
    if errors:
        raise ConfigError(errors)
    merged: dict = {}
    for base in bases:
        merged = _deep_merge(merged, _resolve_file(path.parent / base, chain + (path,)))
    return _deep_merge(merged, data)


def _parse_override(text: str) -> dict:
    """'a.b=value' -> {'a': {'b': value}}; the value is YAML, except that str keys keep the raw text."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    value = _parse_yaml(raw, f"override {text!r}") if raw else ""
    if key in _LEAF_DEFAULTS and _leaf_type(key) is str and value is not None and not isinstance(value, str):
        value = raw  # e.g. data.task=2024 stays the string "2024"
    for part in reversed(key.split(".")):
        value = {part: value}
    errors = _structure_errors(value, f"override {text!r}")
    if errors:
        raise ConfigError(errors)
    return value


def _experiment_name(path: str | os.PathLike | None) -> str:
    """configs/vit_b16/lora_pyra_high.yaml -> 'vit_b16/lora_pyra_high'; outside any configs/ dir: the stem."""
    if not path:
        return "default"
    parts = Path(os.path.normpath(Path(path).absolute())).with_suffix("").parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "configs":
            return "/".join(parts[i + 1:])
    return parts[-1]


def _coerce_floats(cfg: dict) -> None:
    """Ints given for float keys become floats, so downstream code sees one type per key."""
    for key, default in _LEAF_DEFAULTS.items():
        section, _, leaf = key.rpartition(".")
        holder = _get(cfg, section) if section else cfg
        value = holder[leaf]
        if _leaf_type(key) is float and value is not None:
            holder[leaf] = float(value)
        elif isinstance(default, list) and default and isinstance(default[0], float):
            holder[leaf] = [float(v) for v in value]


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> EasyDict:
    """Defaults <- YAML file (with its `_base_` chain) <- "dotted.key=value" overrides, validated.

    Sets ``experiment`` (when empty) from the path under configs/, and ``config_path`` to ``path``.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = _deep_merge(cfg, _resolve_file(Path(path)))
    if isinstance(overrides, str):
        overrides = [overrides]
    errors = []
    for text in overrides:
        try:
            cfg = _deep_merge(cfg, _parse_override(text))
        except ConfigError as e:
            errors += e.errors
    if errors:
        raise ConfigError(errors)
    validate_config(cfg)
    _coerce_floats(cfg)
    if not cfg["experiment"]:
        cfg["experiment"] = _experiment_name(path)
    cfg["config_path"] = str(path) if path is not None else ""
    return EasyDict(cfg)


# ------------------------------------------------------------------------------------------------ output
def config_to_dict(cfg: Mapping) -> dict:
    """A plain nested dict/list copy (no EasyDict, no tuples) for checkpoints, JSON and YAML."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(cfg)


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML that load_config reads back to the same config.

    ``config_path`` is left out (it is not a settable key; it goes in the header comment). The write is
    atomic (temp file in the same directory, fsync, rename), so a crash never leaves half a config.
    """
    data = config_to_dict(cfg)
    source = data.pop("config_path", "") or "defaults"
    text = (f"# Resolved PYRA config (from {source}); reload with lib.config.load_config(path).\n"
            + yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

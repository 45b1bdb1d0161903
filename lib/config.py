"""Experiment configuration: PYRA's typed sections, their defaults and rules, and the resolved config.

A run is one :class:`Config`. ``load_config`` merges the defaults, a YAML file (with its ``_base_`` chain)
and ``dotted.key=value`` overrides, checks everything at once (each problem naming the file or override
and the key) before any data or model is touched, and returns the dataclasses below. The YAML machinery
is ``lib.yamlconf``; the allowed values and model rules are asked of the modules that own them
(``_OWNERS``, ``models.get_backbone``, ``models.resolve_schedule``), so none is restated here.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib.yamlconf import ConfigError, Schema, bounded, dump_yaml, get_dotted, short_repr, spread
from lib.yamlconf import to_dict as config_to_dict
from models.backbones import get_backbone
from models.methods import REDUCTION_METHODS

if TYPE_CHECKING:
    from models.vit import Merging

__all__ = ["Config", "ModelConfig", "PeftConfig", "MergingConfig", "DataConfig", "OptimConfig", "SchedConfig",
           "TrainConfig", "ReportConfig", "LogConfig", "DEFAULTS", "ConfigError", "load_config",
           "validate_config", "resolve_config", "save_config", "config_to_dict", "current_form"]


# The sections: keys, types, defaults; ``bounded(default, low, ...)`` adds the range load_config enforces.
@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224_in21k"  # a models.backbones name, or "vit" (custom sizes below)
    pretrained: str = ""                      # checkpoint path; "" = random weights (demo, tests)
    allow_partial: bool = False               # load a pretrained file with tensors this model does not use
    adapted: str = ""                         # a run's last.pth / best.pth loaded after it ("" = none)
    img_size: int = bounded(224, 1)
    global_pool: str = ""                     # "" = the backbone's own (class token; MAE: avg)
    embed_dim: int | None = bounded(None, 1)  # sizes: None = the named backbone's own; required for "vit"
    depth: int | None = bounded(None, 1)
    num_heads: int | None = bounded(None, 1)
    patch_size: int | None = bounded(None, 1)
    drop_path_rate: float = bounded(0.1, 0, high=1)


@dataclass
class PeftConfig:
    type: str = "lora"
    dim: int | None = bounded(None, 1)        # LoRA rank / Adapter width / prompt tokens; None = the default
    dropout: float = bounded(0.1, 0, high=1)
    init: str = "official"
    prompt_mode: str = "shallow"              # peft.type=prompt only


LEGACY_OPTIONS = "options"   # merging.options: the earlier spelling of merging.<selected method>, still read


def _method_keys() -> tuple[str, ...]:
    """The names ``merging.<name>`` may take: every registered method (also one registered at run time), and
    the earlier spelling ``options`` (``current_form`` moves it)."""
    return (*REDUCTION_METHODS, LEGACY_OPTIONS)


@dataclass
class MergingConfig:
    # null | a named schedule (low, high) | int | a per-layer list of ints | {r: int, inflection: in [-1, 1]}
    r: Merging = None
    method: str = "tome"                      # the reduction method: a models.reduction.REDUCTION_METHODS name
    # merging.<method>: a method's own keys (its Options), e.g. merging.diffrate: {search: true}; any registered
    # method's may be given (each checked against its Options); the selected method's keys build the model
    methods: dict[str, dict] = spread(_method_keys)
    # false | true (the paper's PYRA) | {weights: both|channel|token, activation: sigmoid|none,
    # generator: adaptive|static|gated_mlp} (models.pyra.PYRAVariant; missing keys: the paper's)
    pyra: Any = False
    prop_attn: bool = True

    @property
    def method_options(self) -> dict:
        """The selected method's keys, ``merging.<method>`` (what ``create_model(method_options=...)`` gets)."""
        return self.methods.get(self.method, {})

    def __getattr__(self, name: str) -> dict:
        """``cfg.merging.<method>``: that method's keys as given (``{}``: none), as ``merging.<method>`` in YAML."""
        if name in REDUCTION_METHODS:
            return self.__dict__.get("methods", {}).get(name, {})
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass
class DataConfig:
    root: str = "data/vtab-1k"
    task: str = "cifar"
    train_split: str = "train800val200"
    eval_split: str = "test"
    normalization: str = "imagenet"
    num_classes: int | None = bounded(None, 1)  # None = read from the dataset
    augment: str = ""
    num_workers: int = bounded(4, 0)
    skip_bad_images: bool = False


@dataclass
class OptimConfig:
    lr: float = bounded(1e-3, 0)
    weight_decay: float = bounded(1e-4, 0)
    eps: float = bounded(1e-8, 0, strict=True)
    betas: list[float] = bounded([0.9, 0.999])
    pyra_lr: float = bounded(1e-4, 0)
    pyra_weight_decay: float = bounded(1e-4, 0)
    clip_grad: float | None = bounded(None, 0, strict=True)


@dataclass
class SchedConfig:
    warmup_epochs: int = bounded(10, 0)
    warmup_lr: float = bounded(1e-6, 0)
    min_lr: float = bounded(1e-5, 0)


@dataclass
class TrainConfig:
    epochs: int = bounded(100, 1)
    batch_size: int = bounded(32, 1)
    eval_batch_size: int = bounded(128, 1)
    eval_interval: int = bounded(10, 1)
    precision: str = "fp32"
    drop_last: bool = False
    device: str = "auto"
    compile: str = "off"                      # torch.compile of training and evaluation: lib.engine.COMPILE_MODES
    tf32: bool = False                        # TF32 fp32 GEMMs / convolutions (Ampere+); false: IEEE fp32
    grad_checkpointing: bool = False          # timm's set_grad_checkpointing: recompute blocks, less memory
    slurm_mem: str = ""                       # --mem of a SLURM array element (e.g. 64G); "" = the cluster's default


@dataclass
class ReportConfig:
    benchmark_batch: int = bounded(64, 1)
    benchmark_seconds: float = bounded(2.0, 0, strict=True)
    flops: bool = True
    speedup: bool = False                     # time merged vs unmerged inference at the end (opt-in)


@dataclass
class LogConfig:
    tensorboard: bool = False                 # reserved for an optional TensorBoard log


@dataclass
class Config:
    experiment: str = ""                      # "" -> derived from the config path
    output_dir: str = "logs"
    seed: int = bounded(0, 0)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    merging: MergingConfig = field(default_factory=MergingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    config_path: str = ""                     # set by load_config; never read from files or overrides


# key -> (module, constant) that owns its allowed values (a tuple, or a dict keyed by them)
_OWNERS = {"peft.type": ("models.peft", "PEFT_TYPES"), "peft.init": ("models.peft", "PEFT_INITS"),
           "peft.prompt_mode": ("models.prompt", "PROMPT_MODES"), "model.global_pool": ("models.vit", "GLOBAL_POOLS"),
           "data.normalization": ("lib.data", "NORMALIZATIONS"), "train.precision": ("lib.engine", "PRECISIONS"),
           "merging.method": ("models.reduction", "REDUCTION_METHODS"),
           "train.compile": ("lib.engine", "COMPILE_MODES")}
_NOT_EMPTY = ("output_dir", "data.root", "data.task", "data.train_split", "data.eval_split")
_SIZES, _CUSTOM = ("embed_dim", "depth", "num_heads", "patch_size"), "vit"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_MEMORY = re.compile(r"(\d+[KMGT]?)?")   # sbatch --mem: a number of MB, or with a K/M/G/T suffix
# Names that become folders and pass through shell scripts: portable file-name characters only (a newline
# in a name made scripts read a wrong line, a task with a space or "*" splits or globs in a word list, ".."
# leaves the output folder). An experiment may also hold spaces (inside a name) and "/" (sub-folders).
_NAME_PART = {False: re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*"),
              True: re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.+= -]*[A-Za-z0-9_.+=-])?")}
_FOLDER_NAMES = {"experiment": True, "data.task": False}   # key -> whether "/" and spaces are allowed
_PATHS = ("output_dir", "data.root", "model.pretrained")    # free paths, but never control characters
_SCHEMA = Schema(Config, runtime=["config_path"], free=["merging.r", "merging.pyra"])
# r: judged by models.resolve_schedule; pyra by models.pyra.parse_pyra; merging.<method> by the method's Options
DEFAULTS: dict[str, Any] = {k: v for k, v in config_to_dict(Config()).items() if k != "config_path"}


def _allowed(key: str) -> tuple:
    module, name = _OWNERS[key]
    return tuple(getattr(importlib.import_module(module), name))


def _model_errors(m: Mapping) -> tuple[list[str], int | None]:
    """Backbone name, size keys, divisibility; and the depth the model will have (None: unknown)."""
    name, own, errors = m["name"], {s: m[s] for s in _SIZES}, []
    if name != _CUSTOM:
        try:
            own = {s: getattr(get_backbone(name), s) for s in _SIZES}
        except ValueError as e:
            return [f"model.name: {e} ({_CUSTOM!r} = a custom ViT sized by model.{', model.'.join(_SIZES)})"], None
    for s in _SIZES:
        if name == _CUSTOM and m[s] is None:
            errors.append(f"model.{s}: required for the custom {_CUSTOM!r} (null = a named backbone's own)")
        elif m[s] is not None and m[s] != own[s]:
            errors.append(f"model.{s}: {name} has {s} {own[s]}, not {m[s]}; leave it null (the backbone's own)")
    dim, heads, patch = own["embed_dim"], own["num_heads"], own["patch_size"]
    if patch and patch >= 1 and m["img_size"] % patch:
        errors.append(f"model.img_size: {m['img_size']} is not divisible by the patch size {patch}")
    if dim and heads and heads >= 1 and dim % heads:
        errors.append(f"model.embed_dim: {dim} is not divisible by model.num_heads ({heads})")
    return errors, own["depth"] if own["depth"] and own["depth"] >= 1 else None


def _merging_errors(m: Mapping) -> tuple[list[str], bool]:
    """The methods' own keys (``merging.<method>``: every one given and the selected one's) and the PYRA
    variant, judged by their owners; and whether PYRA is on."""
    from models.pyra import parse_pyra
    from models.reduction import check_options
    errors, pyra_on = [], False
    selected, spread = m["method"], _SCHEMA.spread_keys()   # another method's empty mapping gives nothing to check
    names = [k for k in m if f"merging.{k}" in spread and k not in (LEGACY_OPTIONS, selected) and m[k] != {}]
    for name in [selected] * (selected in REDUCTION_METHODS) + names:
        keys = m.get(name, {})   # the selected method's: its defaults when none are given
        if not isinstance(keys, Mapping):
            errors.append(f"merging.{name}: expected a mapping of the keys of method {name!r}, got {short_repr(keys)}")
            continue
        try:
            check_options(name, keys)
        except (ValueError, TypeError) as e:
            errors.append(str(e))
    try:
        pyra_on = parse_pyra(m["pyra"]) is not None
    except (ValueError, TypeError) as e:
        errors.append(str(e))
    return errors, pyra_on


def _value_errors(cfg: Mapping, owners: bool) -> list[str]:
    errors = [f"{k}: expected one of {', '.join(v or repr(v) for v in _allowed(k))}; got "
              f"{short_repr(get_dotted(cfg, k))}" for k in _OWNERS if owners and get_dotted(cfg, k) not in _allowed(k)]
    if not _DEVICE.fullmatch(cfg["train"]["device"]):
        errors.append(f"train.device: expected auto, cpu, cuda or cuda:N; got {short_repr(cfg['train']['device'])}")
    errors += [e for k, nested in _FOLDER_NAMES.items() if get_dotted(cfg, k) for e in
               [_name_error(k, get_dotted(cfg, k), nested)] if e]
    errors += [f"{k}: {short_repr(get_dotted(cfg, k))} holds a control character (newline, tab, ...)"
               for k in _PATHS if any(ord(c) < 32 or ord(c) == 127 for c in get_dotted(cfg, k))]
    if not _MEMORY.fullmatch(str(cfg["train"]["slurm_mem"])):
        errors.append(f"train.slurm_mem: expected sbatch's --mem (e.g. 64G, 16000M; \"\" = default); "
                      f"got {short_repr(cfg['train']['slurm_mem'])}")
    errors += [f"{k}: must not be empty" for k in _NOT_EMPTY if not get_dotted(cfg, k)] + _SCHEMA.bound_errors(cfg)
    betas, warmup, epochs = cfg["optim"]["betas"], cfg["sched"]["warmup_epochs"], cfg["train"]["epochs"]
    if all(math.isfinite(b) for b in betas) and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        errors.append(f"optim.betas: expected 2 floats in [0, 1), got {short_repr(list(betas))}")
    if warmup > epochs:
        errors.append(f"sched.warmup_epochs: {warmup} is more than train.epochs ({epochs})")
    model_errors, depth = _model_errors(cfg["model"])
    r = cfg["merging"]["r"]
    pyra_errors, pyra_on = _merging_errors(cfg["merging"]) if owners else ([], bool(cfg["merging"]["pyra"]))
    errors += pyra_errors
    if depth is not None and owners:
        from models.vit import resolve_schedule
        try:
            per_layer = resolve_schedule(r, cfg["model"]["name"], depth)
        except (ValueError, TypeError) as e:
            per_layer, errors = None, errors + [f"merging.r: {e}"]   # ConfigError cuts a long line
        if pyra_on and per_layer is not None and not any(per_layer):
            errors.append(f"merging.pyra: PYRA needs token merging, but merging.r is {short_repr(r)} (no token is "
                          "merged); set merging.r or merging.pyra: false")
    return errors + model_errors


def _name_error(key: str, name: str, nested: bool) -> str | None:
    """Why ``name`` cannot be the folder name ``key`` gives (None: it can)."""
    parts = name.split("/") if nested else [name]
    if all(_NAME_PART[nested].fullmatch(part) and len(part.encode()) <= 255 for part in parts):
        return None
    allowed = (f"letters, digits and _ . + = -{' and inner spaces' if nested else ''}, starting with a letter, "
               f"digit or _, at most 255 per name" + (", sub-folders separated by /" if nested else ""))
    return f"{key}: {short_repr(name)} cannot name a folder: use {allowed}"


def current_form(data: Mapping) -> dict:
    """A copy of a config mapping in today's spelling, so that a run made by an earlier version reads (and
    compares) as the same config: ``merging.options`` (the earlier spelling, in config.yaml and checkpoints of
    earlier runs) is read as ``merging.<selected method>``; a ConfigError names both keys when both are given
    and differ. An empty ``merging.options`` (the earlier default) says nothing."""
    if not isinstance(data, Mapping) or not isinstance(data.get("merging"), Mapping):
        return copy.deepcopy(data)   # validation says what it is
    out = copy.deepcopy(dict(data))
    m, method = out["merging"], out["merging"].get("method", MergingConfig.method)
    if LEGACY_OPTIONS not in m or not isinstance(method, str) or method not in REDUCTION_METHODS:
        return out   # nothing to move (an unknown method: validation names it)
    legacy, own = m[LEGACY_OPTIONS], m.get(method)
    if not isinstance(legacy, Mapping):
        raise ConfigError(f"merging.{LEGACY_OPTIONS}: expected a mapping of the keys of method {method!r} (the "
                          f"earlier spelling of merging.{method}), got {short_repr(legacy)}")
    if legacy and own is not None and own != legacy:
        raise ConfigError(f"merging.{LEGACY_OPTIONS} and merging.{method} both give the keys of method {method!r} "
                          f"and differ ({short_repr(dict(legacy))} vs {short_repr(own)}); keep merging.{method} "
                          f"(merging.{LEGACY_OPTIONS} is its earlier spelling)")
    moved = {method: dict(legacy)} if legacy and own is None else {}
    out["merging"] = {k: v for key, value in m.items() if key != LEGACY_OPTIONS
                      for k, v in [(key, value), *(moved.items() if key == "method" else ())]}
    out["merging"].update(moved)   # beside merging.method (config.yaml's order); at the end without one
    return out


def validate_config(cfg: Config | Mapping, model_checks: bool = True) -> None:
    """Check keys, types and values of a complete config; raise ConfigError listing every problem.

    ``model_checks=False`` leaves out what the model modules judge (allowed PEFT / pooling / method
    values, the schedule, PYRA's variant: torch start-up), for scripts that only need names and paths
    and start train.py, which checks everything.
    """
    data = current_form(config_to_dict(cfg))
    errors = _SCHEMA.structure_errors(data, None, complete=True) or _value_errors(data, model_checks)
    if errors:
        raise ConfigError(errors)


def _experiment_name(path: str | os.PathLike | None) -> str:
    """configs/vit_b16/lora_pyra_high.yaml -> 'vit_b16/lora_pyra_high'; outside any configs/ dir: the stem."""
    parts = Path(os.path.normpath(Path(path).absolute())).with_suffix("").parts if path else ("default",)
    inside = [i for i, part in enumerate(parts[:-1]) if part == "configs"]
    return "/".join(parts[inside[-1] + 1:]) if inside else parts[-1]


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                model_checks: bool = True) -> Config:
    """Defaults <- YAML file (with its `_base_` chain) <- "dotted.key=value" overrides, validated.

    Sets ``experiment`` (when empty) from the path under configs/, and ``config_path`` to ``path``.
    ``model_checks``: see :func:`validate_config`.
    """
    data = current_form(_SCHEMA.layers(DEFAULTS, path, overrides))   # merging.options read as merging.<method>
    validate_config(data, model_checks)
    if not data["experiment"]:
        data["experiment"] = _experiment_name(path)
        error = _name_error("experiment", data["experiment"], nested=True)
        if error:
            raise ConfigError(f"{error} (derived from the config path {short_repr(str(path))}; set experiment=NAME)")
    return _SCHEMA.build({**data, "config_path": str(path) if path is not None else ""})


def resolve_config(cfg: Config, model: Any) -> Config:
    """A copy of ``cfg`` holding what ``model`` (built from it) really has: the PEFT rank / width / prompt
    count, the per-layer ``merging.r`` it applies (after clamping), the backbone's sizes and pooling.

    Saved as the run's config.yaml it says what trained, and ``load_config`` of it builds the same model.
    """
    from models import Adapter, LoRALinear, VisualPrompts, unwrap_model
    model, out = unwrap_model(model), copy.deepcopy(cfg)
    out.model.embed_dim, out.model.depth = int(model.embed_dim), len(model.blocks)
    out.model.num_heads, out.model.patch_size = model.blocks[0].attn.num_heads, model.patch_embed.patch_size[0]
    if model.global_pool in _allowed("model.global_pool"):
        out.model.global_pool = model.global_pool
    out.merging.r = list(model.r)
    width = {LoRALinear: lambda m: m.lora_down.out_features, Adapter: lambda m: m.down.out_features,
             VisualPrompts: lambda m: m.num_tokens}
    dims = [get(m) for m in model.modules() for kind, get in width.items() if isinstance(m, kind)]
    out.peft.dim = dims[0] if dims else cfg.peft.dim   # none / full: nothing has a width
    validate_config(out)
    return out


def save_config(cfg: Config | Mapping, path: str | os.PathLike) -> None:
    """Write the config as YAML that load_config reads back to the same config, atomically (a crash
    never leaves half a file). ``config_path`` is not a settable key: it goes in the header comment."""
    from lib.checkpointing import atomic_write
    data = config_to_dict(cfg)
    text = f"# PYRA config (from {data.pop('config_path', '') or 'defaults'}); reload with lib.config.load_config.\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + dump_yaml(data), encoding="utf-8"))

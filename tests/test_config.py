"""lib/config.py and configs/: typed sections, defaults, inheritance, overrides, validation errors, owners of
the allowed values, the resolved config, the committed configs."""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

import lib.config as config_module
import lib.data
import lib.engine
import models.peft
import models.prompt
import models.vit
from lib.build import build_model
from lib.config import (
    DEFAULTS,
    Config,
    ConfigError,
    MergingConfig,
    ModelConfig,
    OptimConfig,
    config_to_dict,
    load_config,
    resolve_config,
    save_config,
    validate_config,
)
from models import parse_r, resolve_schedule
from models.backbones import ABLATION_SETTINGS, BACKBONES, REDUCTION_SETTINGS, SCHEDULES, named_schedule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_generator():
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- defaults
def test_defaults_load_and_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 100 and cfg.merging.r is None
    assert cfg.experiment == "default" and cfg.config_path == ""
    expected = {**copy.deepcopy(DEFAULTS), "experiment": "default", "config_path": ""}
    assert config_to_dict(cfg) == expected
    validate_config(copy.deepcopy(DEFAULTS))


def test_loading_never_mutates_defaults():
    before = copy.deepcopy(DEFAULTS)
    cfg = load_config(overrides=["optim.betas=[0.5, 0.6]", "model.img_size=32"])
    cfg.optim.betas.append(1.0)
    cfg.model.name = "changed"
    assert DEFAULTS == before


# ---------------------------------------------------------------------------------------- inheritance
def test_base_chain_two_levels_deep_merge_and_later_wins(tmp_path):
    write(tmp_path / "configs/_base_/root.yaml", "optim:\n  lr: 0.5\n  weight_decay: 0.25\ntrain:\n  epochs: 70\n")
    write(tmp_path / "configs/_base_/mid.yaml", "_base_: root.yaml\noptim:\n  lr: 0.1\nmerging:\n  r: [1, 2]\n")
    write(tmp_path / "configs/_base_/other.yaml", "train:\n  epochs: 90\n  batch_size: 4\nmerging:\n  r: [3]\n")
    leaf = write(tmp_path / "configs/exp/leaf.yaml",
                 "_base_: [../_base_/mid.yaml, ../_base_/other.yaml]\ntrain:\n  batch_size: 5\n")
    cfg = load_config(leaf)
    assert cfg.optim.lr == 0.1                  # mid overrides root
    assert cfg.optim.weight_decay == 0.25       # deep merge keeps root's sibling key
    assert cfg.train.epochs == 90               # later base wins over earlier
    assert cfg.train.batch_size == 5            # the file itself wins over its bases
    assert cfg.merging.r == [3]                 # lists replace, they do not concatenate
    assert cfg.train.eval_interval == DEFAULTS["train"]["eval_interval"]
    assert cfg.experiment == "exp/leaf" and cfg.config_path == str(leaf)


def test_experiment_name(tmp_path):
    assert load_config(write(tmp_path / "elsewhere/my_run.yaml", "seed: 1\n")).experiment == "my_run"
    named = write(tmp_path / "configs/a/b.yaml", "experiment: fixed\n")
    assert load_config(named).experiment == "fixed"
    assert load_config(CONFIGS / "vit_b16/lora_pyra_high.yaml").experiment == "vit_b16/lora_pyra_high"


# ------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize("override, key, expected", [
    ("optim.lr=1e-4", "optim.lr", 1e-4),              # YAML 1.1 would leave this a string
    ("optim.lr=3.0E-3", "optim.lr", 3e-3),
    ("optim.lr=1", "optim.lr", 1.0),                  # ints are accepted for floats...
    ("optim.clip_grad=2", "optim.clip_grad", 2.0),
    ("train.drop_last=true", "train.drop_last", True),
    ("merging.r=[16, 10]", "merging.r", [16, 10]),
    ("merging.r=[16, 0]", "merging.r", [16, 0]),       # a list is always per layer (two layers here)
    ("merging.r={r: 16, inflection: 0.5}", "merging.r", {"r": 16, "inflection": 0.5}),
    ("merging.r={r: 16, inflection: -0.5}", "merging.r", {"r": 16, "inflection": -0.5}),
    ("merging.r={r: 16}", "merging.r", {"r": 16}),
    ("merging.r=high", "merging.r", "high"),
    ("merging.r=8", "merging.r", 8),
    ("optim.betas=[0, 1e-1]", "optim.betas", [0.0, 0.1]),
    ("peft.dim=null", "peft.dim", None),
    ("peft.dim=16", "peft.dim", 16),
    ("data.num_classes=10", "data.num_classes", 10),
    ("data.task=dtd", "data.task", "dtd"),
    ("data.task=no", "data.task", "no"),              # not a YAML 1.1 boolean
    ("data.task=2024", "data.task", "2024"),          # str keys keep the text
    ("data.augment=", "data.augment", ""),
    ("experiment=my run", "experiment", "my run"),
    ("model.pretrained=weight/x=y.npz", "model.pretrained", "weight/x=y.npz"),
    ("model={name: vit, depth: 6, embed_dim: 48, num_heads: 3, patch_size: 16}", "model.depth", 6),
    ("model.depth=12", "model.depth", 12),             # a named backbone's own depth may be spelled out
    ("model.patch_size=16", "model.patch_size", 16),
    ("peft.prompt_mode=deep", "peft.prompt_mode", "deep"),
    ("log.tensorboard=true", "log.tensorboard", True),
])
def test_override_values(override, key, expected):
    cfg = load_config(overrides=[override])
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_on_top_of_file_in_order():
    cfg = load_config(CONFIGS / "vit_b16/lora_pyra_high.yaml",
                      ["optim.lr=0.1", "optim.lr=0.2", "merging.r=low", "data.task=dtd"])
    assert cfg.optim.lr == 0.2 and cfg.merging.r == "low" and cfg.merging.pyra is True
    assert cfg.data.task == "dtd" and cfg.model.name == "vit_base_patch16_224_in21k"
    nested = load_config(overrides=["model={name: vit, depth: 6, embed_dim: 48, num_heads: 3, patch_size: 16}"])
    assert nested.model.depth == 6 and nested.model.img_size == 224   # deep merge, siblings kept


# ----------------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize("overrides, needles", [
    (["optim.pyra_lrr=1"], ["optim.pyra_lrr", "did you mean optim.pyra_lr?"]),
    (["train.epoch=3"], ["train.epoch", "did you mean train.epochs?"]),
    (["train.lr=0.1"], ["train.lr", "did you mean optim.lr?"]),
    (["optimizer.lr=0.1"], ["'optimizer'", "did you mean optim?"]),
    (["config_path=x.yaml"], ["unknown key 'config_path'"]),
    (["optim.lr"], ["optim.lr", "dotted.key=value"]),
    (["optim.lr=[1"], ["optim.lr=[1", "invalid YAML"]),
    (["train.epochs=ten"], ["train.epochs", "expected int", "'ten'"]),
    (["train.epochs=10.0"], ["train.epochs", "expected int"]),
    (["train.batch_size=true"], ["train.batch_size", "expected int", "True"]),
    (["optim.lr=true"], ["optim.lr", "expected float"]),
    (["optim.lr=null"], ["optim.lr", "expected float", "None"]),
    (["train.drop_last=1"], ["train.drop_last", "expected bool"]),
    (["optim.betas=[0.9, fast]"], ["optim.betas", "list of float"]),
    (["optim.betas=[0.9]"], ["optim.betas", "2 floats"]),
    (["optim.betas=[0.9, 1.5]"], ["optim.betas", "[0, 1)"]),
    (["model=vit"], ["model", "expected a mapping"]),
    (["peft.type=prefix"], ["peft.type", ", ".join(models.peft.PEFT_TYPES), "'prefix'"]),
    (["peft.init=kaiming"], ["peft.init", ", ".join(models.peft.PEFT_INITS)]),
    (["peft.prompt_mode=wide"], ["peft.prompt_mode", ", ".join(models.prompt.PROMPT_MODES), "'wide'"]),
    (["data.normalization=clip"], ["data.normalization", ", ".join(lib.data.NORMALIZATIONS)]),
    (["train.precision=fp8"], ["train.precision", ", ".join(lib.engine.PRECISIONS)]),
    (["model.global_pool=max"], ["model.global_pool", "token, avg", "'max'"]),
    (["log.tensorboard=1"], ["log.tensorboard", "expected bool"]),
    (["log.tensorbord=true"], ["log.tensorbord", "did you mean log.tensorboard?"]),
    (["train.device=gpu"], ["train.device", "'gpu'"]),
    (["peft.dim=0"], ["peft.dim", ">= 1", "0"]),
    (["peft.dim=-4"], ["peft.dim", ">= 1"]),
    (["model.name=vit", "model.embed_dim=0"], ["model.embed_dim", ">= 1"]),
    (["train.epochs=0"], ["train.epochs", ">= 1"]),
    (["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    (["train.eval_batch_size=-1"], ["train.eval_batch_size", ">= 1"]),
    (["train.eval_interval=0"], ["train.eval_interval", ">= 1"]),
    (["optim.lr=-1e-3"], ["optim.lr", ">= 0"]),
    (["optim.lr=.nan"], ["optim.lr", ">= 0"]),
    (["optim.eps=0"], ["optim.eps", "> 0"]),
    (["optim.clip_grad=0"], ["optim.clip_grad", "> 0"]),
    (["model.drop_path_rate=1.0"], ["model.drop_path_rate", "< 1"]),
    (["data.num_workers=-1"], ["data.num_workers", ">= 0"]),
    (["data.task="], ["data.task", "must not be empty"]),
    (["sched.warmup_epochs=11", "train.epochs=10"], ["sched.warmup_epochs", "train.epochs"]),
    (["merging.r=[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"], ["merging.r", "13 entries", "12 layers"]),
    (["model.name=vit", "model.depth=4", "merging.r=[1, 1, 1, 1, 1]"], ["merging.r", "4 layers"]),
    (["merging.r=-2"], ["merging.r", ">= 0"]),
    (["merging.r=[4, -1]"], ["merging.r", "negative"]),
    (["merging.r={r: 16, inflection: 1.5}"], ["merging.r", "inflection", "[-1, 1]", "1.5"]),
    (["merging.r={r: 16, inflection: -1.5}"], ["merging.r", "inflection", "[-1, 1]", "-1.5"]),
    (["merging.r={r: 16.0, inflection: 0.5}"], ["merging.r", "integer", "16.0"]),
    (["merging.r={r: 16, slope: 0.5}"], ["merging.r", "'r' and 'inflection'"]),
    (["merging.r=[16, 0.5]"], ["merging.r", "per-layer", "integers"]),      # a list is never (r, inflection)
    (["merging.r=[16, 0.5, 1]"], ["merging.r", "per-layer", "integers"]),
    (["merging.r=medium"], ["merging.r", "'low' or 'high'", "'medium'"]),
    (["merging.r=true"], ["merging.r", "True"]),
    (["model.name=vit", "model.depth=6", "merging.r=high"], ["merging.r", "custom depth of 6"]),
    (["merging.pyra=true"], ["PYRA needs token merging"]),
    (["merging.pyra=true", "merging.r=0"], ["PYRA needs token merging"]),
    (["merging.pyra=true", "merging.r=[0, 0, 0]"], ["PYRA needs token merging"]),
    (["merging.pyra=true", "merging.r={r: 0, inflection: 0.5}"], ["PYRA needs token merging"]),
    (["model.name=vit_b16"], ["model.name", "vit_base_patch16_224_in21k", "'vit'"]),
    (["model.name=vit", "model.embed_dim=100", "model.num_heads=3"], ["model.embed_dim", "model.num_heads"]),
    (["model.img_size=100"], ["model.img_size", "patch size 16"]),
    (["model.name=vit", "model.img_size=32", "model.patch_size=5"], ["model.img_size", "patch size 5"]),
    (["model.depth=6"], ["model.depth", "vit_base_patch16_224_in21k has depth 12, not 6"]),
    (["model.patch_size=14"], ["model.patch_size", "patch_size 16, not 14"]),
    (["model.name=vit_large_patch16_224_in21k", "model.embed_dim=768"], ["model.embed_dim", "1024, not 768"]),
    (["model.name=vit", "model.depth=2"], ["model.embed_dim: required", "model.num_heads: required",
                                           "model.patch_size: required"]),
])
def test_invalid_overrides_raise_config_error(overrides, needles):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    for needle in needles:
        assert needle in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.batch_size=0", "optim.lr=-1", "peft.type=x"])
    assert len(info.value.errors) == 3
    assert all(key in str(info.value) for key in ("train.batch_size", "optim.lr", "peft.type"))
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.epoch=1", "optim.lrr=2"])
    assert len(info.value.errors) == 2


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_valid_edge_values_pass():
    load_config(overrides=["sched.warmup_epochs=100", "optim.lr=0", "data.num_workers=0", "train.device=cuda:1"])
    load_config(overrides=["merging.r=[40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]", "merging.pyra=true"])
    load_config(overrides=["merging.r={r: 16, inflection: 1.0}", "merging.pyra=true", "merging.prop_attn=false"])
    load_config(overrides=["merging.r={r: 16, inflection: -1}", "merging.pyra=true"])
    load_config(overrides=["merging.r=[16, 0]", "merging.pyra=true"])
    load_config(overrides=["model.name=vit", "model.depth=24", "model.embed_dim=48", "model.num_heads=3",
                           "model.patch_size=16", "merging.r=low"])
    load_config(overrides=["model.depth=12", "model.embed_dim=768", "model.num_heads=12", "model.patch_size=16"])
    load_config(overrides=["model.name=vit_large_patch16_224_in21k", "merging.r=[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, "
                           "1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"])


@pytest.mark.parametrize("text, needles", [
    ("optim:\n  pyra_lrr: 1.0e-4\n", ["bad.yaml", "optim.pyra_lrr", "did you mean optim.pyra_lr?"]),
    ("trian:\n  epochs: 3\n", ["bad.yaml", "'trian'", "did you mean train?"]),
    ("train:\n  epochs: 3\n  batch_size: [32\n", ["bad.yaml:", "invalid YAML", "at line 3"]),
    ("train:\n  epochs: 3\n   batch_size: 32\n", ["bad.yaml:3", "invalid YAML"]),
    ("train:\n  epochs: 3\n  epochs: 4\n", ["bad.yaml:3", "duplicate key 'epochs'"]),
    ("- optim\n- lr\n", ["bad.yaml", "top level must be a mapping", "list"]),
    ("just a string\n", ["bad.yaml", "top level must be a mapping"]),
    ("train: 3\n", ["bad.yaml", "train", "expected a mapping"]),
    ("train:\n  epochs: 3.5\n", ["bad.yaml", "train.epochs", "expected int", "3.5"]),
    ("model:\n  _base_: x.yaml\n", ["bad.yaml", "model._base_"]),
    ("_base_: 3\n", ["bad.yaml", "_base_", "3"]),
    ("_base_: [a.yaml, null]\n", ["bad.yaml", "_base_"]),
    ("_base_: missing.yaml\n", ["missing.yaml", "not found", "bad.yaml"]),
    ("_base_: bad.yaml\n", ["bad.yaml", "cycle"]),
])
def test_invalid_files_raise_config_error_naming_the_file(tmp_path, text, needles):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "bad.yaml", text))
    for needle in needles:
        assert needle in str(info.value)


def test_errors_in_a_base_file_name_that_base(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*train\.epoch.*did you mean train\.epochs"):
        load_config(write(tmp_path / "leaf.yaml", "_base_: base.yaml\n"))
    write(tmp_path / "mid.yaml", "_base_: gone/deeper.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "top.yaml", "_base_: mid.yaml\n"))
    assert "deeper.yaml" in str(info.value) and "mid.yaml" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "empty.yaml", "# nothing\n"))
    assert cfg.optim == OptimConfig() and config_to_dict(cfg.optim) == DEFAULTS["optim"]


def test_validate_config_checks_a_built_config():
    cfg = copy.deepcopy(DEFAULTS)
    del cfg["train"]["epochs"]
    with pytest.raises(ConfigError, match="missing key 'train.epochs'"):
        validate_config(cfg)
    cfg = copy.deepcopy(DEFAULTS)
    cfg["optim"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        validate_config(cfg)
    cfg = load_config()
    cfg.config_path = 3
    with pytest.raises(ConfigError, match="config_path"):
        validate_config(cfg)
    validate_config(load_config(CONFIGS / "demo/digits.yaml"))   # config_path is allowed after loading


# -------------------------------------------------------------------------------- the committed configs
ALL_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS)
def test_every_committed_config_loads(path):
    cfg = load_config(ROOT / path)
    validate_config(cfg)
    assert cfg.experiment == Path(path).relative_to("configs").with_suffix("").as_posix()


LEAF_MODELS = {
    "vit_b16": "vit_base_patch16_224_in21k",
    "vit_l16": "vit_large_patch16_224_in21k",
    "vit_s16": "vit_small_patch16_224_in21k",
    "deit_b": "deit_base_distilled_patch16_224",
    "deit_s": "deit_small_distilled_patch16_224",
    "mae_vit_b": "mae_vit_base_patch16",
}
LEAF_MERGING = {  # merging base -> (merging.r, merging.pyra)
    "none": (None, False), "tome_low": ("low", False), "tome_high": ("high", False),
    "pyra_low": ("low", True), "pyra_high": ("high", True),
}
LEAVES = [(b, p, m) for b in LEAF_MODELS for p in ("lora", "adapter") for m in LEAF_MERGING]
LEAVES += [("vit_b16", "prompt", m) for m in LEAF_MERGING]          # visual prompts: ViT-B/16 only


# the other reduction methods at ToMe's FLOPs (models.backbones.REDUCTION_SETTINGS): ViT-B/16 + LoRA only
METHOD_LEAVES = [f"vit_b16/lora_{m}_{level}.yaml" for m, levels in REDUCTION_SETTINGS.items() for level in levels]


def test_the_grid_has_its_65_leaves_and_nothing_else():
    assert len(LEAVES) == 65
    found = sorted(p.relative_to(CONFIGS).as_posix() for b in LEAF_MODELS for p in (CONFIGS / b).glob("*.yaml")
                   if not re.fullmatch(r"lora_r\d+_.+\.yaml", p.name))   # the rank leaves: tests/test_lora_ranks.py
    assert found == sorted([f"{b}/{p}_{m}.yaml" for b, p, m in LEAVES] + METHOD_LEAVES)


@pytest.mark.parametrize("backbone, peft, merging", LEAVES)
def test_leaf_resolves_to_its_experiment(backbone, peft, merging):
    path = CONFIGS / backbone / f"{peft}_{merging}.yaml"
    cfg = load_config(path)
    name = LEAF_MODELS[backbone]
    assert cfg.model.name == name
    assert cfg.model.pretrained == f"weight/{BACKBONES[name].checkpoint}"
    assert (cfg.peft.type, cfg.peft.dim, cfg.peft.dropout) == (peft, None, 0.1)   # None: the default width / prompts
    assert (cfg.merging.r, cfg.merging.pyra, cfg.merging.prop_attn) == (*LEAF_MERGING[merging], True)
    if cfg.merging.r is not None:
        assert len(named_schedule(cfg.merging.r, name)) == BACKBONES[name].depth
    # the official recipe (configs/_base_/vtab.yaml)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps, cfg.optim.betas) == (1e-3, 1e-4, 1e-8, [0.9, 0.999])
    assert (cfg.optim.pyra_lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.eval_interval) == (1e-4, 32, 100, 10)
    assert (cfg.sched.warmup_epochs, cfg.sched.warmup_lr, cfg.sched.min_lr) == (10, 1e-6, 1e-5)
    assert (cfg.model.drop_path_rate, cfg.train.precision, cfg.seed) == (0.1, "fp32", 0)
    assert (cfg.data.train_split, cfg.data.eval_split, cfg.data.augment) == ("train800val200", "test", "")
    # leaves only list bases: no settings of their own
    assert set(yaml.safe_load(path.read_text())) == {"_base_"}


def test_demo_config_keeps_tokens_and_merges_every_layer():
    cfg = load_config(CONFIGS / "demo/digits.yaml")
    assert cfg.model.name == "vit" and cfg.merging.pyra is True and cfg.data.num_workers == 0
    tokens = (cfg.model.img_size // cfg.model.patch_size) ** 2 + 1
    for r in cfg.merging.r:
        assert 0 < r <= (tokens - 1) // 2           # never clamped by the bipartite matching
        tokens -= r
    assert len(cfg.merging.r) == cfg.model.depth and tokens > 1


def test_generate_check_passes_on_the_committed_configs():
    result = subprocess.run([sys.executable, str(CONFIGS / "generate.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_generate_writes_idempotently_and_check_detects_drift(tmp_path, monkeypatch, capsys):
    generator = load_generator()
    monkeypatch.setattr(generator, "CONFIGS", tmp_path)
    assert generator.main(["--check"]) == 1                 # everything missing
    assert generator.main([]) == 0
    files = sorted(tmp_path.rglob("*.yaml"))
    # 65 leaves + 6 model bases + 5 merging bases + the ablation rows + ViT-B LoRA ranks 12, 32 (2 bases,
    # 10 leaves) + the other methods' leaves
    assert len(files) == 76 + len(ABLATION_SETTINGS) + 12 + len(METHOD_LEAVES)
    assert len(list(tmp_path.glob("vit_b16/ablation/*.yaml"))) == 9
    snapshot = {p: p.read_text() for p in files}
    assert generator.main([]) == 0 and {p: p.read_text() for p in files} == snapshot
    assert generator.main(["--check"]) == 0
    (tmp_path / "vit_b16/lora_none.yaml").write_text("_base_: []\n")
    assert generator.main(["--check"]) == 1
    assert "differs" in capsys.readouterr().err
    generator.main([])
    write(tmp_path / "deit_s/lora_old.yaml", generator.HEADER)
    assert generator.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    generator.main([])
    assert not (tmp_path / "deit_s/lora_old.yaml").exists() and generator.main(["--check"]) == 0


# -------------------------------------------------------------------------------------------- output
def test_save_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "vit_l16/adapter_tome_high.yaml",
                      ["optim.clip_grad=1", "merging.r={r: 8, inflection: -0.25}", "data.task=dtd", "peft.dim=null"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]      # no temp file left behind
    again = load_config(out)
    assert again.config_path == str(out) and again.experiment == "vit_l16/adapter_tome_high"
    strip = lambda c: {k: v for k, v in config_to_dict(c).items() if k != "config_path"}  # noqa: E731
    assert strip(again) == strip(cfg) and again.merging.r == {"r": 8, "inflection": -0.25}
    assert "config_path" not in yaml.safe_load(out.read_text())             # plain YAML readers agree too
    assert yaml.safe_load(out.read_text())["optim"]["eps"] == 1e-8
    save_config(load_config(), out)                                           # overwrite in place
    assert load_config(out).merging.r is None


def test_save_config_leaves_old_file_when_write_fails(tmp_path, monkeypatch):
    out = write(tmp_path / "config.yaml", "seed: 1\n")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(config_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_config(load_config(), out)
    assert out.read_text() == "seed: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_config_to_dict_is_plain_and_json_ready():
    cfg = load_config(CONFIGS / "demo/digits.yaml")
    plain = config_to_dict(cfg)
    assert type(plain) is dict and type(plain["model"]) is dict and type(plain["merging"]["r"]) is list
    assert json.loads(json.dumps(plain)) == plain
    depth = cfg.model.depth
    plain["model"]["depth"] = depth + 95
    assert cfg.model.depth == depth                     # a copy, not a view


# ------------------------------------------------------------------------------------------- typed
def test_config_is_typed_dataclasses():
    cfg = load_config(CONFIGS / "demo/digits_random.yaml", ["optim.lr=1", "merging.r={r: 2, inflection: -0.5}"])
    assert dataclasses.is_dataclass(cfg) and isinstance(cfg.model, ModelConfig)
    assert isinstance(cfg.merging, MergingConfig)
    hints = typing.get_type_hints(ModelConfig)
    assert hints["img_size"] is int and hints["depth"] == int | None and hints["patch_size"] == int | None
    assert typing.get_type_hints(MergingConfig, localns={"Merging": models.vit.Merging})["r"] == models.vit.Merging
    assert typing.get_type_hints(OptimConfig)["betas"] == list[float]
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0 and type(cfg.train.epochs) is int
    assert cfg.peft.prompt_mode == "shallow" and cfg.log.tensorboard is False
    clone = copy.deepcopy(cfg)
    clone.model.pretrained = "elsewhere.pth"                      # consumers may assign attributes
    clone.merging.r["r"] = 7
    assert cfg.model.pretrained == "" and cfg.merging.r == {"r": 2, "inflection": -0.5}
    validate_config(clone)
    assert DEFAULTS == {k: v for k, v in config_to_dict(Config()).items() if k != "config_path"}


def test_mapping_leaf_replaces_in_inheritance(tmp_path):
    write(tmp_path / "base.yaml", "merging:\n  r: {r: 16, inflection: -0.5}\n  pyra: true\n")
    cfg = load_config(write(tmp_path / "leaf.yaml", "_base_: base.yaml\nmerging:\n  r: {r: 8}\n"))
    assert cfg.merging.r == {"r": 8} and cfg.merging.pyra is True   # r replaced whole, its section merged


# ------------------------------------------------------------------------------------ merging forms
def test_merging_mapping_with_negative_inflection_decreases():
    cfg = load_config(overrides=["merging.r={r: 16, inflection: -0.5}", "merging.pyra=true"])
    per_layer = resolve_schedule(cfg.merging.r, cfg.model.name, 12)
    assert per_layer == parse_r(12, (16, -0.5)) and per_layer[0] == 24 and per_layer[-1] == 8
    assert all(a >= b for a, b in zip(per_layer, per_layer[1:]))


def test_two_element_list_stays_per_layer():
    cfg = load_config(overrides=["merging.r=[16, 0]"])
    assert cfg.merging.r == [16, 0]
    assert resolve_schedule(cfg.merging.r, cfg.model.name, 12) == [16] + [0] * 11


# --------------------------------------------------------------------------------- owners of the rules
OWNED = [  # config key, owning module, constant
    ("peft.type", models.peft, "PEFT_TYPES"),
    ("peft.init", models.peft, "PEFT_INITS"),
    ("peft.prompt_mode", models.prompt, "PROMPT_MODES"),
    ("model.global_pool", models.vit, "GLOBAL_POOLS"),
    ("data.normalization", lib.data, "NORMALIZATIONS"),
    ("train.precision", lib.engine, "PRECISIONS"),
]


@pytest.mark.parametrize("key, owner, constant", OWNED)
def test_allowed_values_come_from_their_owner(monkeypatch, key, owner, constant):
    values = getattr(owner, constant)
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[f"{key}=novel"])
    added = {**values, "novel": None} if isinstance(values, dict) else (*values, "novel")
    monkeypatch.setattr(owner, constant, added)
    section, leaf = key.split(".")
    assert getattr(getattr(load_config(overrides=[f"{key}=novel"]), section), leaf) == "novel"
    default = getattr(getattr(Config(), section), leaf)
    monkeypatch.setattr(owner, constant, tuple(v for v in values if v != default))
    with pytest.raises(ConfigError, match=f"{key}: expected one of"):
        load_config()                                       # the owner dropped the default: refused


def test_backbone_names_and_patch_size_come_from_the_backbone_table(monkeypatch):
    spec = dataclasses.replace(BACKBONES["vit_base_patch16_224_in21k"], patch_size=14)
    monkeypatch.setitem(BACKBONES, "my_vit_patch16", spec)    # the name says 16: the spec (14) decides
    load_config(overrides=["model.name=my_vit_patch16", "model.img_size=210", "model.patch_size=14"])
    with pytest.raises(ConfigError, match="not divisible by the patch size 14"):
        load_config(overrides=["model.name=my_vit_patch16", "model.img_size=208"])
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        load_config(overrides=["model.name=nope"])


def test_schedule_rules_come_from_models(monkeypatch):
    monkeypatch.setitem(SCHEDULES["vit_base"], "medium", [8] * 12)
    load_config(overrides=["merging.r=medium", "merging.pyra=true"])
    monkeypatch.setitem(SCHEDULES["vit_base"], "medium", [0] * 12)
    with pytest.raises(ConfigError, match="PYRA needs token merging"):
        load_config(overrides=["merging.r=medium", "merging.pyra=true"])


def test_config_module_restates_no_owned_enum():
    source = Path(config_module.__file__).read_text()
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for _, owner, constant in OWNED:   # at most one value each: the section's default, never the allowed set
        assert len(set(getattr(owner, constant)) - {""} & strings) <= 1, constant
    assert not {name for family in SCHEDULES.values() for name in family} & strings   # low / high
    assert "patch(" not in source and "SCHEDULES" not in source and "BACKBONES" not in source


TORCH_FREE = """
import sys
import models                           # the real package: its names load lazily
from lib.config import ConfigError, load_config
cfg = load_config("configs/demo/digits.yaml", ["data.task=dtd"], model_checks=False)  # as scripts/common.sh
for overrides in (["train.epoch=3"], ["model.depth=5", "optim.lr=-1"]):
    try:
        load_config(None, overrides, model_checks=False)
    except ConfigError as e:
        print(len(e.errors), " | ".join(e.errors))
print(cfg.data.task, "torch" in sys.modules)
"""


def test_scripts_load_configs_without_torch():
    """Run-folder lookups in the shell scripts and the sweep load configs without the model checks: no torch
    import (seconds per call); the checks that need the torch-based owners are left to train.py."""
    out = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.splitlines()[-1] == "dtd False"
    first, second, _ = out.stdout.splitlines()
    assert first.startswith("1 ") and "did you mean train.epochs" in first and second.startswith("2 ")
    assert "has depth 12, not 5" in second and "optim.lr: must be >= 0" in second


# ---------------------------------------------------------------------------------- resolved config
def _rebuilt(cfg, tmp_path, num_classes=10):
    torch.manual_seed(0)
    model = build_model(cfg, num_classes, pretrained=False)
    resolved = resolve_config(cfg, model)
    save_config(resolved, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == {**config_to_dict(resolved), "config_path": str(tmp_path / "config.yaml")}
    rebuilt = build_model(again, num_classes, pretrained=False)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(rebuilt) == shapes(model) and rebuilt.r == model.r
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    return resolved, model


@pytest.mark.parametrize("peft", models.peft.PEFT_TYPES)
def test_resolved_config_rebuilds_the_same_model(tmp_path, peft):
    cfg = load_config(CONFIGS / "demo/digits_random.yaml", [f"peft.type={peft}", "peft.dim=null"])
    resolved, model = _rebuilt(cfg, tmp_path)
    assert resolved.merging.r == model.r == [4, 3] and resolved.model.global_pool == "avg"
    if peft in ("lora", "adapter", "prompt"):
        assert isinstance(resolved.peft.dim, int) and resolved.peft.dim >= 1   # the default width, spelled out
    else:
        assert resolved.peft.dim is None                                        # nothing has a width


def test_resolved_config_of_a_named_backbone(tmp_path):
    cfg = load_config(CONFIGS / "vit_s16/lora_pyra_high.yaml", ["model.pretrained=", "model.img_size=64"])
    assert (cfg.peft.dim, cfg.merging.r, cfg.model.depth) == (None, "high", None)
    resolved, model = _rebuilt(cfg, tmp_path)                 # 16 patches: the high schedule is clamped
    spec = BACKBONES[cfg.model.name]
    assert resolved.peft.dim == spec.peft_dim
    assert resolved.merging.r == model.r != named_schedule("high", cfg.model.name)
    assert (resolved.model.depth, resolved.model.embed_dim, resolved.model.num_heads, resolved.model.patch_size) == (
        spec.depth, spec.embed_dim, spec.num_heads, spec.patch_size)
    text = (tmp_path / "config.yaml").read_text()
    assert "dim: null" not in text and "r: high" not in text and f"r: {model.r}".replace("'", "") in text


# ------------------------------------------------------------------------------ a method's keys: merging.<method>
DEMO = CONFIGS / "demo/digits_random.yaml"


def test_an_override_of_a_method_key_reaches_the_model():
    """merging.diffrate.search=true (keys given one by one merge into the method's mapping) builds a searching
    DiffRate."""
    cfg = load_config(DEMO, ["merging.method=diffrate", "merging.r=null", "merging.pyra=false",
                             "merging.diffrate.search=true", "merging.diffrate.target_flops=2e6"])
    assert cfg.merging.diffrate == cfg.merging.method_options == {"search": True, "target_flops": 2e6}
    model = build_model(cfg, num_classes=10, pretrained=False)
    assert [type(b.reduction).__name__ for b in model.blocks] == ["DiffRate", "DiffRate"]
    assert all(b.reduction.options.search and b.reduction.options.target_flops == 2e6 for b in model.blocks)


def test_an_unknown_or_bad_key_of_a_method_names_merging_method_key():
    fpet = CONFIGS / "vit_b16/lora_fpet_low.yaml"
    with pytest.raises(ConfigError, match=r"merging\.fpet\.refine_dm: unknown key of method 'fpet'; expected "
                                          r"refine_dim, refine_bits, refine_dropout"):
        load_config(fpet, ["merging.fpet.refine_dm=4"])
    with pytest.raises(ConfigError, match=r"merging\.fpet\.refine_dm: unknown key of method 'fpet'"):
        load_config(DEMO, ["merging.fpet={refine_dm: 4}"])          # checked although ToMe is the method
    with pytest.raises(ConfigError, match=r"unknown key 'merging\.fpte'; did you mean merging\.fpet\?"):
        load_config(DEMO, ["merging.fpte.refine_dim=4"])
    with pytest.raises(ConfigError, match=r"merging\.fpet: expected a mapping of the keys of method 'fpet', got 4"):
        load_config(DEMO, ["merging.fpet=4"])
    with pytest.raises(ConfigError, match=r"merging\.tome\.k: unknown key of method 'tome'; expected none"):
        load_config(DEMO, ["merging.tome.k=1"])
    assert load_config(fpet, ["merging.fpet.refine_dim=16"]).merging.fpet == {
        "refine_dim": 16, "refine_bits": 1, "refine_dropout": 0.1}      # one key replaced, the others kept
    assert load_config(fpet, ["merging.fpet={refine_dim: 16}"]).merging.fpet == {"refine_dim": 16}   # the whole


def test_a_config_with_two_methods_keys_switches_by_merging_method(tmp_path):
    both = write(tmp_path / "both.yaml", f"_base_: [{DEMO}]\nmerging:\n  method: tofu\n  pyra: false\n"
                 "  tofu: {merge_from: 1, mlerp: false}\n  pitome: {margin: 0.5, alpha: 2.0}\n")
    tofu, pitome = load_config(both), load_config(both, ["merging.method=pitome"])
    assert tofu.merging.method_options == {"merge_from": 1, "mlerp": False}
    assert pitome.merging.method_options == {"margin": 0.5, "alpha": 2.0}
    model = build_model(tofu, num_classes=10, pretrained=False)
    assert [(type(b.reduction).__name__, b.reduction.merge_from, b.reduction.options.mlerp) for b in model.blocks] \
        == [("ToFu", 1, False)] * 2
    model = build_model(pitome, num_classes=10, pretrained=False)
    assert [(type(b.reduction).__name__, b.reduction.options.margin) for b in model.blocks] == [("PiToMe", 0.5)] * 2
    save_config(pitome, tmp_path / "config.yaml")                    # both kept, in the saved config too
    assert load_config(tmp_path / "config.yaml").merging.methods == {"tofu": {"merge_from": 1, "mlerp": False},
                                                                      "pitome": {"margin": 0.5, "alpha": 2.0}}
    with pytest.raises(ConfigError, match=r"merging\.pitome\.margn: unknown key of method 'pitome'"):
        load_config(both, ["merging.pitome.margn=0.5"])               # the other method's keys are checked too
    with pytest.raises(ConfigError, match=r"merging\.pitome\.margin: expected a number in \[-1, 1\]"):
        load_config(both, ["merging.pitome.margin=3"])


def test_the_earlier_merging_options_spelling_loads_as_the_selected_methods_keys(tmp_path):
    """merging.options (config.yaml of runs made by earlier versions) is read as merging.<method>; the saved
    config writes merging.<method>; giving both differently is an error naming both."""
    old = write(tmp_path / "old.yaml", f"_base_: [{DEMO}]\nmerging:\n  method: tofu\n  pyra: false\n"
                "  options: {merge_from: 1, mlerp: true}\n")
    cfg = load_config(old)
    assert cfg.merging.tofu == cfg.merging.method_options == {"merge_from": 1, "mlerp": True}
    assert "options" not in config_to_dict(cfg)["merging"] and cfg.merging.methods == {"tofu": cfg.merging.tofu}
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["merging"]
    assert "options" not in saved and saved["tofu"] == {"merge_from": 1, "mlerp": True}
    assert list(saved)[:3] == ["r", "method", "tofu"]                 # beside the method it belongs to
    assert config_to_dict(load_config(tmp_path / "config.yaml"))["merging"] == config_to_dict(cfg)["merging"]
    assert load_config(old, ["merging.tofu={merge_from: 1, mlerp: true}"]).merging.tofu == cfg.merging.tofu
    with pytest.raises(ConfigError, match=r"merging\.options and merging\.tofu both give the keys of method 'tofu' "
                                          r"and differ"):
        load_config(old, ["merging.tofu.merge_from=0"])
    with pytest.raises(ConfigError, match=r"merging\.tome\.k: unknown key of method 'tome'; expected none"):
        load_config(DEMO, ["merging.options={k: 1}"])                 # read as the keys of the selected tome
    validate_config({**copy.deepcopy(DEFAULTS), "merging": {**DEFAULTS["merging"], "options": {}}})

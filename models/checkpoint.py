"""Load the checkpoints PYRA users bring: JAX ``.npz``, DeiT/MAE/MoCo ``.pth``, safetensors, the official
PYRA code's fine-tuned models and this project's own checkpoints — safely and with a report.

Nothing is unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``): a file
that needs more is refused before any of its code can run.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import _load_weights, checkpoint_filter_fn

from .pyra import rename_earlier_keys

__all__ = ["CheckpointError", "LoadReport", "OWN_FORMAT", "check_checkpoint_file", "read_checkpoint", "load_checkpoint",
           "trainable_state_dict", "unwrap_model"]

OWN_FORMAT = "pyra-checkpoint"  # value of the "format" key in checkpoints this project writes

# Official PYRA (NOAH-based) parameter names -> this project's names.
_OFFICIAL_RENAMES = [
    (re.compile(r"\.attn\.LoRA_a\."), ".attn.qkv.lora_down."),
    (re.compile(r"\.attn\.LoRA_b\."), ".attn.qkv.lora_up."),
    (re.compile(r"\.adapter\.ln1\."), ".adapter.down."),
    (re.compile(r"\.adapter\.ln2\."), ".adapter.up."),
]   # PYRA's own parameters: models.pyra.rename_earlier_keys
_OFFICIAL_MARKERS = ("LoRA_a", "LoRA_b", "pyra_a", "pyra_b", "pyra_norm", "adapter.ln1")
_HEAD_PREFIXES = ("head.", "head_dist.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names the file and the keys."""


@dataclass
class LoadReport:
    """What a load did: the format seen, and the keys missing, unexpected or deliberately dropped."""

    path: str
    kind: str                                   # "jax-npz", "pretrained", "official-pyra", "pyra"
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self, limit: int = 8) -> str:
        def names(keys: list[str]) -> str:
            more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more
        lines = [f"loaded {self.loaded} tensors from {self.path} ({self.kind})"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("dropped", self.dropped)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {names(keys)}")
        return "\n".join(lines)


def _describe_bytes(head: bytes) -> str:
    """What a file that is not a checkpoint looks like, from its first bytes."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        return "an HTML/XML page (a download that saved an error or login page?)"
    if head and all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        return "a text file"
    return "not a checkpoint"


def check_checkpoint_file(path: str) -> None:
    """A clear error for what cannot be a checkpoint: missing, a directory, or empty."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy?")


def read_checkpoint(path: str) -> dict[str, Any]:
    """Read a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file without executing anything in it.

    Whatever is wrong with the file (missing, a directory, empty, truncated, text or HTML, a bare
    tensor or list, code to unpickle) becomes one ``CheckpointError`` line naming the file.
    """
    check_checkpoint_file(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({_describe_bytes(head)}): "
                                  f"{e}") from None
    is_zip, is_pickle = head.startswith(b"PK\x03\x04"), head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        raise CheckpointError(f"{path} is {_describe_bytes(head)}, not a PyTorch checkpoint")
    try:
        # The official PYRA code saves its argparse Namespace under "args": allow exactly that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "truncated" in str(e).lower() or "ran out of input" in str(e).lower():
            raise CheckpointError(f"{path} is truncated (an interrupted write or copy?): {e}") from None
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which could run code hidden in the file "
            f"(torch.load weights_only=True rejected it; none of its code was run). Re-save it as a plain "
            f"state dict of tensors or as safetensors. Details: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({os.path.getsize(path)} bytes; a zip "
                              f"checkpoint cut short by an interrupted write or copy?): {reason}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint (a mapping of "
                              f"parameter names to tensors, or one with a 'model' / 'state_dict' entry)")
    return ckpt


def _unwrap(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor dict inside the common wrappers (``model``, ``state_dict``) and prefixes (DDP, MoCo)."""
    for key in ("model", "state_dict", "module"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    sd = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("base_encoder.") for k in sd):   # MoCo v3: keep the query encoder only
        sd = {k.removeprefix("base_encoder."): v for k, v in sd.items() if k.startswith("base_encoder.")}
    return sd


def _rename_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def _adapt_pretrained(sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """Drop what a pretraining checkpoint has that the adapted model must not take (heads, MAE decoder)."""
    drop = sorted(k for k in sd if k.startswith(_HEAD_PREFIXES + ("decoder", "mask_token")))
    report.dropped += drop
    sd = {k: v for k, v in sd.items() if k not in drop}
    # MAE fine-tuning pools the patch tokens and normalises after pooling: its encoder norm becomes fc_norm.
    if isinstance(getattr(model, "fc_norm", None), nn.LayerNorm) and not isinstance(model.norm, nn.LayerNorm):
        for name in ("weight", "bias"):
            if f"norm.{name}" in sd and f"fc_norm.{name}" not in sd:
                sd[f"fc_norm.{name}"] = sd.pop(f"norm.{name}")
    return checkpoint_filter_fn(sd, model)


def _load_npz(model: nn.Module, path: str) -> LoadReport:
    """Google's JAX ViT checkpoints through timm's loader; the 21k head is not loaded (shape differs)."""
    import numpy as np

    report = LoadReport(path, "jax-npz")
    params = dict(model.named_parameters())
    versions = {k: p._version for k, p in params.items()}
    try:
        _load_weights(model, path)
    except KeyError as e:
        raise CheckpointError(f"{path}: the JAX checkpoint lacks {e} that this architecture needs") from None
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit this architecture: {e}") from None
    except (ValueError, OSError, EOFError) as e:   # not a zip archive, truncated, pickled objects
        with open(path, "rb") as f:
            head = f.read(64)
        what = "truncated or corrupt" if head.startswith(b"PK") else _describe_bytes(head)
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({what}): {e}") from None
    changed = {k for k, p in params.items() if p._version != versions[k]}
    report.loaded = len(changed)
    report.missing = sorted(set(params) - changed)
    with np.load(path, allow_pickle=False) as npz:
        report.dropped = sorted(k for k in npz.files if k.startswith(("head/", "pre_logits/"))
                                and not {"head.weight", "head.bias"} <= changed)
    return report


def load_checkpoint(model: nn.Module, path: str, kind: str = "auto") -> LoadReport:
    """Load ``path`` into ``model`` and report what was missing, unexpected or dropped.

    ``kind``: ``"pretrained"`` drops the checkpoint's head (a new task head is trained), ``"finetuned"``
    keeps it and requires its shape to match; ``"auto"`` picks finetuned for this project's own and the
    official PYRA checkpoints, pretrained otherwise. A shape mismatch names every key and both shapes.
    """
    if kind not in ("auto", "pretrained", "finetuned"):
        raise ValueError(f"kind must be 'auto', 'pretrained' or 'finetuned', got {kind!r}")
    if path.endswith(".npz"):
        check_checkpoint_file(path)
        return _load_npz(model, path)

    ckpt = read_checkpoint(path)
    own = ckpt.get("format") == OWN_FORMAT
    sd = _unwrap(ckpt)
    if not sd:
        raise CheckpointError(f"{path} holds no tensor (keys: {sorted(ckpt)[:8]}): nothing to load")
    official = any(marker in k for k in sd for marker in _OFFICIAL_MARKERS)
    if official:
        sd = _rename_official(sd)
    sd = rename_earlier_keys(sd)
    finetuned = own or official if kind == "auto" else kind == "finetuned"
    report = LoadReport(path, "pyra" if own else "official-pyra" if official else
                        "finetuned" if finetuned else "pretrained")
    if not finetuned:
        sd = _adapt_pretrained(sd, model, report)

    model_sd = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
                  for k, v in sd.items() if k in model_sd and v.shape != model_sd[k].shape]
    if mismatched:
        raise CheckpointError(f"{path} does not fit this model (another architecture or class count?); "
                              f"shape mismatch in {len(mismatched)} key(s):\n  " + "\n  ".join(mismatched))
    result = model.load_state_dict(sd, strict=False)
    report.loaded = len(sd) - len(result.unexpected_keys)
    report.missing = sorted(result.missing_keys)
    report.unexpected = sorted(result.unexpected_keys)
    return report


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (PEFT, PYRA, heads): what this project's checkpoints store."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


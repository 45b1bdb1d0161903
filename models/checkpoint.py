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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import checkpoint_filter_fn
from torch.overrides import TorchFunctionMode

__all__ = ["CheckpointError", "LoadReport", "OWN_FORMAT", "check_checkpoint_file", "read_checkpoint", "load_checkpoint",
           "trainable_state_dict", "unwrap_model", "rename_earlier_keys"]

OWN_FORMAT = "pyra-checkpoint"  # value of the "format" key in checkpoints this project writes

# Official PYRA (NOAH-based) parameter names -> this project's names.
_OFFICIAL_RENAMES = [
    (re.compile(r"\.attn\.LoRA_a\."), ".attn.qkv.lora_down."),
    (re.compile(r"\.attn\.LoRA_b\."), ".attn.qkv.lora_up."),
    (re.compile(r"\.adapter\.ln1\."), ".adapter.down."),
    (re.compile(r"\.adapter\.ln2\."), ".adapter.up."),
]   # PYRA's own parameters: _EARLIER_PYRA_KEYS
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
        """The report in a few lines: every checkpoint tensor that was not used (unexpected, dropped) is
        named; the model's missing keys (the parts trained from scratch, often many) are cut at ``limit``."""
        def names(keys: list[str], cut: bool) -> str:
            more = f", ... (+{len(keys) - limit})" if cut and len(keys) > limit else ""
            return ", ".join(keys[:limit] if cut else keys) + more
        lines = [f"loaded {self.loaded} tensors from {self.path} ({self.kind})"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("dropped", self.dropped)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {names(keys, cut=label == 'missing')}")
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


def _unwrap(ckpt: dict[str, Any], dropped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensor dict inside the common wrappers (``model``, ``state_dict``) and prefixes (DDP, MoCo);
    the tensors left out (MoCo's momentum encoder and predictor) are appended to ``dropped``."""
    for key in ("model", "state_dict", "module"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    sd = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("base_encoder.") for k in sd):   # MoCo v3: keep the query encoder only
        if dropped is not None:
            dropped += sorted(k for k in sd if not k.startswith("base_encoder."))
        sd = {k.removeprefix("base_encoder."): v for k, v in sd.items() if k.startswith("base_encoder.")}
    return sd


def _renamed(sd: Mapping[str, Any], rules: list[tuple[re.Pattern, str]]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


# Earlier names of the paper's PYRA parameters -> this layout's: the official code's (``pyra_a`` = W_r,
# ``pyra_b`` = W_D, ``pyra_norm``) and this project's before PYRA moved into the block's reduction module
# (``pyra.weight_r``, ``pyra.weight_d``, ``pyra.norm``). Same tensors, same shapes: they load exactly.
_EARLIER_PYRA_KEYS = [
    (re.compile(r"^(.*blocks\.\d+)\.(?:pyra_a|pyra\.weight_r)$"), r"\1.reduction.pyra.to_channel_weight"),
    (re.compile(r"^(.*blocks\.\d+)\.(?:pyra_b|pyra\.weight_d)$"), r"\1.reduction.pyra.to_token_weight"),
    (re.compile(r"^(.*blocks\.\d+)\.(?:pyra_norm|pyra\.norm)\.(weight|bias)$"), r"\1.reduction.pyra.norm.\2"),
]


def rename_earlier_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict with PYRA's earlier parameter names (official code, this project's older runs) renamed."""
    return _renamed(state_dict, _EARLIER_PYRA_KEYS)


def _adapt_pretrained(sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """Drop what a pretraining checkpoint has that the adapted model must not take (heads, MAE decoder)."""
    drop = sorted(k for k in sd if k.startswith(_HEAD_PREFIXES + ("decoder", "mask_token", "pre_logits")))
    report.dropped += drop
    sd = {k: v for k, v in sd.items() if k not in drop}
    # MAE fine-tuning pools the patch tokens and normalises after pooling: its encoder norm becomes fc_norm.
    if isinstance(getattr(model, "fc_norm", None), nn.LayerNorm) and not isinstance(model.norm, nn.LayerNorm):
        for name in ("weight", "bias"):
            if f"norm.{name}" in sd and f"fc_norm.{name}" not in sd:
                sd[f"fc_norm.{name}"] = sd.pop(f"norm.{name}")
    return checkpoint_filter_fn(sd, model)


def _non_finite(name: str, values: Any, path: str) -> CheckpointError | None:
    """The error for a tensor / array holding NaN or inf (None if it is finite or not floating point)."""
    import numpy as np

    if isinstance(values, torch.Tensor):
        if not (values.is_floating_point() or values.is_complex()) or bool(torch.isfinite(values).all()):
            return None
        nan, finite, total = int(torch.isnan(values).sum()), int(torch.isfinite(values).sum()), values.numel()
    else:
        if not np.issubdtype(values.dtype, np.inexact) or bool(np.isfinite(values).all()):
            return None
        nan, finite, total = int(np.isnan(values).sum()), int(np.isfinite(values).sum()), values.size
    return CheckpointError(f"{path}: tensor {name!r} holds non-finite values ({nan} NaN, {total - nan - finite} "
                           f"infinite of {total}); refusing to load it (a corrupt file, or saved from a diverged "
                           f"run?)")


def _check_finite(sd: dict[str, torch.Tensor], path: str) -> None:
    """Refuse weights with NaN/inf at load, naming the first such tensor (in the file's order)."""
    for name, tensor in sd.items():
        error = _non_finite(name, tensor, path)
        if error is not None:
            raise error


def _scan_npz(path: str) -> list[str]:
    """The array names of a ``.npz``, every array read once (never unpickled) and checked to be finite.

    What the file is when it is not a readable archive of numeric arrays is said as such: pickled Python
    objects (refused, their code never runs), a single ``.npy`` array, truncated or corrupt, text or HTML.
    """
    import zipfile
    import zlib

    import numpy as np

    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"PK"):
        what = "a single .npy array, not an .npz archive" if head.startswith(b"\x93NUMPY") else _describe_bytes(head)
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({what})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            for name in names:
                try:
                    array = npz[name]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise CheckpointError(
                        f"refusing to load {path}: its array {name!r} holds pickled Python objects, which could "
                        f"run code hidden in the file (none of it was run); a checkpoint holds numeric arrays "
                        f"only") from None
                error = _non_finite(name, array, path)
                if error is not None:
                    raise error
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable .npz checkpoint (truncated or corrupt, "
                              f"{os.path.getsize(path)} bytes: an interrupted download or copy?): {reason}") from None
    return names


class _NamedCopies(TorchFunctionMode):
    """Names the model tensor that a converter's ``copy_`` cannot fill (timm's npz loader gives sizes only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except RuntimeError as e:
            if func is not torch.Tensor.copy_ or id(args[0]) not in self.names:
                raise
            name, have, got = self.names[id(args[0])], tuple(args[0].shape), tuple(torch.as_tensor(args[1]).shape)
            raise CheckpointError(f"does not fit this model (another width or architecture?): model tensor "
                                  f"{name!r} is {have}, the checkpoint's is {got}") from e


# Array groups of Google's JAX ViT checkpoints -> the model parameters they fill; an array is used when the
# load changed a parameter of its group (a block beyond the model's depth, or any other group, is unused).
_NPZ_PREFIXES = ("opt/target/", "params/img/", "params/")
_NPZ_GROUPS = ((re.compile(r"Transformer/encoderblock_(\d+)/"), r"blocks.\1."),
               (re.compile(r"Transformer/encoderblock/"), "blocks."),       # all blocks stacked in one array
               (re.compile(r"embedding/"), "patch_embed."),
               (re.compile(r"cls$"), "cls_token"),
               (re.compile(r"(?:Transformer/posembed_input/)?pos_embedding$"), "pos_embed"),
               (re.compile(r"Transformer/encoder_norm/"), "norm."),
               (re.compile(r"head/"), "head."))


def _npz_target(name: str) -> str | None:
    """The model-parameter prefix an array of a JAX ViT checkpoint fills (None: no part of a ViT)."""
    for prefix in _NPZ_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    for pattern, target in _NPZ_GROUPS:
        match = pattern.match(name)
        if match:
            return match.expand(target)
    return None


def _load_npz(model: nn.Module, path: str) -> LoadReport:
    """Google's JAX ViT checkpoints through timm's public loader (``VisionTransformer.load_pretrained``);
    the report says which model parameters it filled and names every array of the file that it did not use.
    The 21k head is not loaded (its shape differs)."""
    arrays = _scan_npz(path)
    report = LoadReport(path, "jax-npz")
    params = dict(model.named_parameters())
    versions = {k: p._version for k, p in params.items()}
    try:
        with _NamedCopies(model):
            model.load_pretrained(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path} {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: the JAX checkpoint lacks {e} that this architecture needs") from None
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit this architecture: {str(e).splitlines()[0]}") from None
    changed = {k for k, p in params.items() if p._version != versions[k]}
    report.loaded = len(changed)
    report.missing = sorted(set(params) - changed)
    for name in arrays:
        target = _npz_target(name)
        if target is not None and any(k.startswith(target) for k in changed):
            continue
        head = name.rsplit("/", 2)[-2] if "/" in name else ""
        (report.dropped if head in ("head", "pre_logits") else report.unexpected).append(name)
    report.dropped.sort()
    report.unexpected.sort()
    return report


def load_checkpoint(model: nn.Module, path: str, kind: str = "auto", allow_unused: bool = True) -> LoadReport:
    """Load ``path`` into ``model`` and report what was missing, unexpected or dropped.

    ``kind``: ``"pretrained"`` drops the checkpoint's head (a new task head is trained), ``"finetuned"``
    keeps it and requires its shape to match; ``"auto"`` picks finetuned for this project's own and the
    official PYRA checkpoints, pretrained otherwise. A shape mismatch names every key and both shapes;
    weights with NaN or inf are refused naming the first such tensor. ``allow_unused=False`` refuses a
    checkpoint with tensors the model does not use (a deeper backbone would otherwise load truncated).
    """
    if kind not in ("auto", "pretrained", "finetuned"):
        raise ValueError(f"kind must be 'auto', 'pretrained' or 'finetuned', got {kind!r}")
    if path.endswith(".npz"):
        check_checkpoint_file(path)
        report = _load_npz(model, path)
    else:
        report = _load_state_dict(model, path, kind)
    if report.unexpected and not allow_unused:
        raise CheckpointError(
            f"{path}: {len(report.unexpected)} tensor(s) of the checkpoint are not used by this model (a deeper or "
            f"larger backbone than the config's?): {', '.join(report.unexpected)}; check model.name and its sizes, "
            f"or set model.allow_partial: true to load only the part that fits")
    return report


def _load_state_dict(model: nn.Module, path: str, kind: str) -> LoadReport:
    """A ``.pth`` / ``.safetensors`` file: unwrapped, renamed (official PYRA), adapted (pretrained), checked."""
    ckpt = read_checkpoint(path)
    own = ckpt.get("format") == OWN_FORMAT
    left_out: list[str] = []
    sd = _unwrap(ckpt, left_out)
    if not sd:
        raise CheckpointError(f"{path} holds no tensor (keys: {sorted(ckpt)[:8]}): nothing to load")
    _check_finite(sd, path)
    official = any(marker in k for k in sd for marker in _OFFICIAL_MARKERS)
    if official:
        sd = _renamed(sd, _OFFICIAL_RENAMES)
    sd = rename_earlier_keys(sd)
    finetuned = own or official if kind == "auto" else kind == "finetuned"
    report = LoadReport(path, "pyra" if own else "official-pyra" if official else
                        "finetuned" if finetuned else "pretrained", dropped=left_out)
    if not finetuned:
        sd = _adapt_pretrained(sd, model, report)
        report.dropped.sort()

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


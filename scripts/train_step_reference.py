#!/usr/bin/env python
"""Training step of the project's plain LoRA model against a straightforward implementation, same run.

    python scripts/train_step_reference.py [--config configs/vit_b16/lora_none.yaml] [--batch-size 8]
        [--rounds 6] [--runs 2] [--threads 2] [--json PATH] [--profile DIR] [key=value ...]

The *reference* is what a researcher would write without this project: stock timm ``VisionTransformer``
(no patching) whose ``qkv`` layers are wrapped by a module holding the frozen ``nn.Linear`` and two
separate ``nn.Linear`` LoRA factors, their output added to qkv's (the official PYRA / NOAH way). Both
models get the same weights (the project model's, copied), the same trainable parameters (LoRA and head),
the same drop-path rate and the same batch; one step is forward, cross-entropy, backward and AdamW
(``lib.benchmark.make_train_step``). The two are timed alternately, round by round, so machine drift hits
both alike; the result is the median step of each and the median of the per-round ratios
(project ÷ reference: below 1 means the project trains faster). ``--profile DIR`` also writes
torch.profiler's operator table of each (``profile_project.txt``, ``profile_reference.txt``: self time and
call count per operator, and by input shape) to find where a difference comes from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from lib.benchmark import device_name, make_train_step, profile_table, time_fn  # noqa: E402
from lib.build import build_model  # noqa: E402
from lib.config import load_config  # noqa: E402
from models.backbones import get_backbone  # noqa: E402

DEFAULT_CONFIG = "configs/vit_b16/lora_none.yaml"


class StraightforwardLoRA(nn.Module):
    """``qkv(x) + lora_B(lora_A(dropout(x)))`` with three plain ``nn.Linear`` (the official code's form)."""

    def __init__(self, qkv: nn.Linear, rank: int, dropout: float) -> None:
        super().__init__()
        self.qkv = qkv
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(qkv.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, qkv.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x) + self.lora_B(self.lora_A(self.dropout(x)))


def build_reference(cfg: Any, num_classes: int, project: nn.Module) -> nn.Module:
    """Stock timm ViT + ``StraightforwardLoRA`` on every qkv, carrying ``project``'s weights."""
    m = cfg.model
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=m.drop_path_rate, img_size=m.img_size)
    if m.global_pool:
        kwargs["global_pool"] = m.global_pool
    if m.name == "vit":
        model = VisionTransformer(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                                  patch_size=m.patch_size, **kwargs)
    else:
        spec = get_backbone(m.name)
        model = timm.create_model(spec.timm_name, pretrained=False, **{**spec.timm_kwargs, **kwargs})
    for block, ours in zip(model.blocks, project.blocks):   # the rank the project resolved (spec default or peft.dim)
        block.attn.qkv = StraightforwardLoRA(block.attn.qkv, ours.attn.qkv.lora_down.out_features, cfg.peft.dropout)
    renamed = {}
    for key, value in project.state_dict().items():
        key = key.replace("attn.qkv.lora_down.", "attn.qkv.lora_A.").replace("attn.qkv.lora_up.", "attn.qkv.lora_B.")
        key = key.replace("attn.qkv.weight", "attn.qkv.qkv.weight").replace("attn.qkv.bias", "attn.qkv.qkv.bias")
        renamed[key] = value
    model.load_state_dict(renamed, strict=True)
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_" in name or name.startswith("head")
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a LoRA config without merging (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    p.add_argument("--runs", type=int, default=2, help="timed steps per model and round")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's default)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--profile", metavar="DIR", help="write each model's profiler table to DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both models' training steps alternately; return medians, per-round ratios and the setting."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = load_config(args.config, args.overrides)
    if cfg.peft.type != "lora" or cfg.merging.r not in (None, 0) or cfg.merging.pyra:
        raise ValueError(f"{args.config}: the reference is plain LoRA; got peft.type={cfg.peft.type!r}, "
                         f"merging.r={cfg.merging.r!r}, merging.pyra={cfg.merging.pyra} "
                         f"(expected lora, null or 0, false)")
    project = build_model(cfg, args.num_classes, pretrained=False)
    reference = build_reference(cfg, args.num_classes, project)
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for name, m in (("project", project), ("reference", reference))}
    if trainable["project"] != trainable["reference"]:
        raise RuntimeError(f"trainable parameters differ: {trainable}")
    steps = {name: make_train_step(m, args.batch_size, args.num_classes, cfg.model.img_size, device)
             for name, m in (("project", project), ("reference", reference))}
    for step in steps.values():
        time_fn(step, device, warmup=1, runs=0)
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    order = list(steps)
    for rnd in range(args.rounds):
        for name in order if rnd % 2 == 0 else order[::-1]:
            times[name].append(time_fn(steps[name], device, warmup=0, runs=args.runs))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        for name, step in steps.items():
            (Path(args.profile) / f"profile_{name}.txt").write_text(profile_table(step, device, row_limit=40),
                                                                    encoding="utf-8")
    per_round = [statistics.median(p) / statistics.median(r) for p, r in zip(times["project"], times["reference"])]
    median = {name: statistics.median([t for rnd in ts for t in rnd]) for name, ts in times.items()}
    return {"config": args.config, "overrides": args.overrides, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "device": device_name(device), "torch": torch.__version__,
            "timm": timm.__version__, "trainable_params": trainable["project"],
            "project_step_s": median["project"], "reference_step_s": median["reference"],
            "ratio_median": statistics.median(per_round), "ratio_per_round": per_round,
            "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"training step, batch {result['batch_size']}, {result['threads']} threads, {result['device']}: "
          f"project {result['project_step_s']:.3f} s, straightforward reference {result['reference_step_s']:.3f} s; "
          f"project / reference per round {', '.join(f'{r:.3f}' for r in result['ratio_per_round'])} "
          f"(median {result['ratio_median']:.3f}); load {result['load_average']:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

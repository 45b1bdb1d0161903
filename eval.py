#!/usr/bin/env python
"""Accuracy of a trained checkpoint on a task, and what merging and LoRA folding buy at inference.

    python eval.py --config configs/vit_b16/lora_pyra_high.yaml --checkpoint logs/.../best.pth data.task=cifar
    python eval.py --config configs/demo/digits.yaml --checkpoint logs/demo/digits/digits/seed0/best.pth --json

The efficiency table has the configured reduction method (``method``: tome, pyra, fpet, diffrate, ...; as
``models.backbones.method_label`` names it) and the same backbone with none, each with LoRA folded and not: parameters,
fvcore GFLOPs, images/s at the chosen batch, device and precision (eager) and the speed-up over the unfolded
backbone without reduction (``lib.benchmark.merged_speedup``: the two alternate, per LoRA variant). The accuracy
pass runs as the config says: ``train.compile`` (e.g. ``train.compile=reduce-overhead`` as an override)
and ``train.tf32``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import torch

from lib.benchmark import count_flops, measure_throughput, merged_speedup
from lib.build import build_model
from lib.config import ConfigError, config_to_dict, load_config
from lib.data import DataError, build_dataset, task_num_classes
from lib.distributed import DistInfo, select_device
from lib.engine import apply_tf32, compile_model, evaluate
from lib.loaders import build_eval_loader
from models import CheckpointError, fold_lora, load_checkpoint, param_report, read_checkpoint, trainable_state_dict
from models.backbones import method_label


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the YAML the checkpoint was trained with")
    p.add_argument("--checkpoint", default="", help="best.pth / last.pth of a run (or an official PYRA model)")
    p.add_argument("--batch-size", type=int, default=64, help="batch for throughput and evaluation")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the config's train.device)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--runs", type=int, default=5, help="rounds of alternating merged / unmerged timing")
    p.add_argument("--no-accuracy", action="store_true", help="only the efficiency report")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the result as JSON to PATH (or stdout)")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate although the checkpoint lacks trained parameters (marked in the result)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the flags


def reduction_method(cfg: Any, model: torch.nn.Module) -> str | None:
    """The model's method as results name it (``models.backbones.method_label``), with the ``r`` it applies."""
    return method_label({**config_to_dict(cfg.merging), "r": list(model.r)})


def efficiency_table(model: torch.nn.Module, cfg: Any, device: torch.device, batch: int, precision: str,
                     rounds: int) -> list[dict[str, Any]]:
    """Configured merging vs none, LoRA folded vs not (``lib.benchmark.merged_speedup`` per LoRA variant)."""
    rows = []
    base = None
    method = reduction_method(cfg, model)
    for lora, m in (("unfolded", model), ("folded", fold_lora(copy.deepcopy(model)))):
        schedule = m.r
        speed = merged_speedup(m, batch, cfg.model.img_size, device, precision, rounds=rounds)
        rates = ([("merged", schedule, speed["merged_images_per_s"]), ("no merging", [0] * len(schedule),
                                                                        speed["plain_images_per_s"])]
                 if speed else [("configured", schedule, measure_throughput(
                     m, batch, cfg.model.img_size, device, precision, runs=rounds)["images_per_s"])])
        for name, r, images_per_s in rates:
            m.r = r
            rows.append({"setting": name, "method": "none" if name == "no merging" else method, "lora": lora,
                         "r": list(m.r), "parameters": param_report(m)["total"][0],
                         "gflops": count_flops(m, cfg.model.img_size) / 2 ** 30, "images_per_s": images_per_s,
                         "batch_size": batch, "device": str(device), "precision": precision,
                         "spread": speed["spread"] if speed else None})
        m.r = schedule
        base = base or rates[-1][2]  # the unfolded model without merging (or the only setting)
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        device = select_device(args.device or cfg.train.device, DistInfo())
        precision = args.precision or cfg.train.precision
        tf32 = apply_tf32(cfg.train.tf32)
        num_classes = cfg.data.num_classes or task_num_classes(cfg.data.task, cfg.data.root)
        eval_set = None
        if not args.no_accuracy or num_classes is None:
            eval_set = build_dataset(cfg.data, cfg.data.eval_split, cfg.model.img_size, is_train=False)
            num_classes = eval_set.num_classes
        model = build_model(cfg, num_classes).to(device)
        result: dict[str, Any] = {"config": args.config, "checkpoint": args.checkpoint, "task": cfg.data.task,
                                  "method": reduction_method(cfg, model),
                                  "compile": cfg.train.compile, "tf32": {"enabled": cfg.train.tf32, **tf32}}
        if args.checkpoint:
            report = load_checkpoint(model, args.checkpoint, kind="finetuned")
            print(report.summary(), file=sys.stderr)
            untrained = sorted(set(trainable_state_dict(model)) & set(report.missing))
            if untrained and not args.allow_missing:
                raise CheckpointError(
                    f"{args.checkpoint} does not fit this config: it lacks {len(untrained)} trained parameter(s) "
                    f"of the model ({', '.join(untrained[:6])}{', ...' if len(untrained) > 6 else ''}); "
                    f"the wrong --config or PEFT type? (--allow-missing evaluates anyway, marked as such)")
            if untrained:
                result["missing_parameters"] = untrained
            if not args.checkpoint.endswith(".npz"):
                result["checkpoint_epoch"] = read_checkpoint(args.checkpoint).get("next_epoch", 0) - 1
        if not args.no_accuracy:
            loader = build_eval_loader(eval_set, args.batch_size, DistInfo(), cfg.data.num_workers,
                                       device.type == "cuda")
            cudagraphs = cfg.train.compile == "reduce-overhead" and device.type == "cuda"
            stats = evaluate(compile_model(model, cfg.train.compile), loader, device, precision, cudagraphs)
            result.update(test_acc1=stats["acc1"], test_acc5=stats["acc5"], test_loss=stats["loss"],
                          test_count=stats["count"])
        result["efficiency"] = efficiency_table(model, cfg, device, args.batch_size, precision, args.runs)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if "missing_parameters" in result:
        print(f"WARNING: {len(result['missing_parameters'])} trained parameter(s) were missing from the "
              f"checkpoint and are at their initial values (--allow-missing)", file=sys.stderr)
    if "test_acc1" in result:
        print(f"{cfg.data.task}: top-1 {result['test_acc1']:.2f}%  top-5 {result['test_acc5']:.2f}%  "
              f"({result['test_count']} images)")
    print(f"{'setting':<12} {'method':<10} {'LoRA':<9} {'params':>12} {'GFLOPs':>8} {'img/s':>10} {'speed-up':>8}")
    for row in result["efficiency"]:
        print(f"{row['setting']:<12} {row.get('method') or '':<10} {row['lora']:<9} {row['parameters']:>12,} "
              f"{row['gflops']:>8.3f} {row['images_per_s']:>10.1f} {row['speedup']:>7.2f}x")
    print(f"(batch {args.batch_size}, {result['efficiency'][0]['device']}, {precision})")
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""This project against the official PYRA code on one CUDA GPU: the same models, batch and timing for both.

    python scripts/speed_records/vs_official/gpu_side_by_side.py ours OUT.json
    PYTHONPATH=TIMM054 python scripts/speed_records/vs_official/gpu_side_by_side.py official OUT.json \
        --official CHECKOUT
    python scripts/speed_records/vs_official/gpu_side_by_side.py table RUN.json ...

ViT-B/16 + LoRA 8 (random weights), 100 classes, batch 256, fp32 and bf16 (``torch.autocast``); plain, ToMe high
and PYRA high, built as ``make_profiles.py`` builds them (the official side from CHECKOUT's ``model`` package under
its timm 0.5.4; nothing of it is copied here). Eval forward: ``no_grad``, settings interleaved, wall clock with the
device synchronised around each call, median of 10 after 3 warm-ups. Training step: forward, cross-entropy,
backward, AdamW over the trainable parameters, median of 5 after 2 warm-ups. This project's side also times, in the
same process, its deployment path (PYRA high, eval, LoRA folded, ``torch.compile``) and, for the LoRA change, the
earlier LoRA form (the update added to the frozen product as a separate sum) against the current one. ``table``
prints ours/official per row (median over the runs given; a ratio above 1 means this project is faster).
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_profiles import CLASSES, build_official, build_ours  # noqa: E402

SETTINGS = ("plain", "tome_high", "pyra_high")
BATCH, WARMUP, RUNS, TRAIN_WARMUP, TRAIN_RUNS = 256, 3, 10, 2, 5
DEVICE = torch.device("cuda")   # main() sets both from --device / --batch


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, runs: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def autocast(precision: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def infer_ms(models: dict, x: torch.Tensor, precision: str) -> dict:
    """Median eval-forward milliseconds per model, the models interleaved round by round."""
    for m in models.values():
        m.eval()
    out = {k: [] for k in models}
    with torch.no_grad(), autocast(precision):
        for m in models.values():
            timed(lambda m=m: m(x), 1, WARMUP)
        for _ in range(RUNS):
            for name, m in models.items():
                out[name].append(timed(lambda m=m: m(x), 1, 0))
    return {k: statistics.median(v) for k, v in out.items()}


def train_ms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    ms = timed(step, TRAIN_RUNS, TRAIN_WARMUP)
    model.eval()
    return ms


def earlier_lora_form(self, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear's forward before the change: the low-rank update added to the frozen product as a sum."""
    return F.linear(x, self.weight, self.bias) + self.lora_up(self.lora_down(self.lora_dropout(x)))


def lora_forms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> dict:
    """Current against earlier LoRA form on one unfolded model: eval forward and training step, alternated."""
    from models.peft import LoRALinear
    current = LoRALinear.forward
    rows = {"infer_current": [], "infer_earlier": [], "train_current": [], "train_earlier": []}
    for _ in range(3):
        for label, form in (("current", current), ("earlier", earlier_lora_form)):
            LoRALinear.forward = form
            try:
                rows[f"infer_{label}"].append(infer_ms({"m": model}, x, precision)["m"])
                rows[f"train_{label}"].append(train_ms(model, x, y, precision))
            finally:
                LoRALinear.forward = current
    return {k: statistics.median(v) for k, v in rows.items()}


def run_side(side: str, official: str | None, main_only: bool = False) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 224, 224, generator=g).to(DEVICE)
    y = torch.randint(CLASSES, (BATCH,), generator=g).to(DEVICE)
    models = {s: (build_official(official, s) if side == "official" else build_ours(s)).to(DEVICE) for s in SETTINGS}
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    result = {"side": side, "gpu": name, "torch": torch.__version__, "batch": BATCH}
    import timm
    result["timm"] = timm.__version__
    for precision in ("bf16", "fp32"):
        rows = {f"infer_{k}": v for k, v in infer_ms(models, x, precision).items()}
        for s in ("plain", "pyra_high"):
            rows[f"train_{s}"] = train_ms(models[s], x, y, precision)
        result[precision] = rows
    if side == "ours" and not main_only:
        import models as ours
        deployed = torch.compile(ours.fold_lora(copy.deepcopy(models["pyra_high"]).eval()))
        with torch.no_grad():
            eager_logits, compiled_logits = models["pyra_high"].eval()(x[:8]), deployed(x[:8])
        result["deploy_max_abs_diff_fp32"] = (eager_logits - compiled_logits).abs().max().item()
        for precision in ("bf16", "fp32"):
            result[precision]["infer_pyra_high_deploy"] = infer_ms({"d": deployed}, x, precision)["d"]
            result[precision]["lora_forms_pyra_high"] = lora_forms(models["pyra_high"], x, y, precision)
            result[precision]["lora_forms_plain"] = lora_forms(models["plain"], x, y, precision)
    return result


def table(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    ours = [r for r in runs if r["side"] == "ours"]
    official = [r for r in runs if r["side"] == "official"]
    lines = [f"{ours[0]['gpu']}, batch {ours[0]['batch']}; ms are medians over {len(ours)} + {len(official)} "
             "processes", "", "| precision | row | ours ms | official ms | ours/official (speed) |",
             "|---|---|---:|---:|---:|"]
    full = [r for r in ours if "infer_pyra_high_deploy" in r["bf16"]]   # the run(s) without --main-only
    for precision in ("bf16", "fp32"):
        for row in ("infer_plain", "infer_tome_high", "infer_pyra_high", "train_plain", "train_pyra_high"):
            a = statistics.median(r[precision][row] for r in ours)
            b = statistics.median(r[precision][row] for r in official)
            lines.append(f"| {precision} | {row} | {a:.2f} | {b:.2f} | **{b / a:.3f}** |")
        a = statistics.median(r[precision]["infer_pyra_high_deploy"] for r in full)
        b = statistics.median(r[precision]["infer_pyra_high"] for r in official)
        lines.append(f"| {precision} | deployment path / official PYRA high eager | {a:.2f} | {b:.2f} "
                     f"| **{b / a:.3f}** |")
    lines += ["", "| precision | model | step | current LoRA form ms | earlier form ms | earlier/current |",
              "|---|---|---|---:|---:|---:|"]
    for precision in ("bf16", "fp32"):
        for model in ("plain", "pyra_high"):
            forms = [r[precision][f"lora_forms_{model}"] for r in full]
            for step in ("infer", "train"):
                cur = statistics.median(f[f"{step}_current"] for f in forms)
                old = statistics.median(f[f"{step}_earlier"] for f in forms)
                lines.append(f"| {precision} | {model} | {step} | {cur:.2f} | {old:.2f} | **{old / cur:.3f}** |")
    return "\n".join(lines)


def main() -> None:
    global DEVICE, BATCH
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("side", choices=["ours", "official", "table"])
    p.add_argument("paths", nargs="+", help="OUT.json for a side; the runs' JSON files for 'table'")
    p.add_argument("--official", help="a checkout of github.com/THU-MIG/PYRA (side 'official')")
    p.add_argument("--device", default="cuda", help="cuda (the record); cpu only checks that the script runs")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--main-only", action="store_true", help="ours: leave out the deployment path and LoRA forms")
    args = p.parse_args()
    DEVICE, BATCH = torch.device(args.device), args.batch
    if args.side == "table":
        print(table(args.paths))
        return
    result = run_side(args.side, args.official, args.main_only)
    Path(args.paths[0]).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

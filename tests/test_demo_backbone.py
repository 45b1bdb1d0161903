"""The shipped demo backbone (weight/demo_vit_p4_32.pth): what the demo config points at, that it loads through
the public loader and still scores its recorded source-task accuracy, that the pretraining script runs and
reproduces its bytes, and that the demo comparison script runs end to end."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from data.make_glyphs import GLYPHS, make_batch, normalize
from lib.config import load_config
from models import create_model, load_checkpoint, param_categories, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "digits.yaml"
SHIPPED = REPO / "weight" / "demo_vit_p4_32.pth"
SHIPPED_SHA256 = "eef2b97c9be7b88de6068906551b2618fe2a10d3cd3c07c5e802cdb3d53caad0"
SMALL = REPO / "weight" / "demo_vit_small_p4_32.pth"        # the small backbone of scripts/demo_compare.sh
SMALL_SHA256 = "5cf63c1070e5f1f545386456156a696db168e3408b8751999274e178cd436a90"
ENV = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def demo_model(num_classes: int, peft: str = "lora", merging=None, pyra: bool = False):
    m = load_config(DEMO).model
    return create_model("vit", num_classes=num_classes, peft=peft, merging=merging, pyra=pyra, img_size=m.img_size,
                        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size,
                        global_pool=m.global_pool)


def test_demo_config_uses_the_committed_backbone():
    cfg = load_config(DEMO)
    path = REPO / cfg.model.pretrained
    assert path == SHIPPED and path.is_file()
    assert sha256(path) == SHIPPED_SHA256
    assert path.stat().st_size <= 10 * 2**20
    readme = (REPO / "weight" / "README.md").read_text()
    assert SHIPPED_SHA256 in readme                     # the record users check against
    # tracked by git despite weight/* being ignored (skipped outside a git checkout)
    probe = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, capture_output=True)
    if probe.returncode in (0, 1):
        assert probe.returncode == 1, f"{path} is git-ignored"
    # the demo merges in every block without the matching clamping r (at most half the patch tokens)
    tokens = (cfg.model.img_size // cfg.model.patch_size) ** 2 + 1
    assert tokens == 65 and cfg.model.embed_dim >= 192
    for r in cfg.merging.r:
        assert 0 < r <= (tokens - 1) // 2
        tokens -= r
    assert len(cfg.merging.r) == cfg.model.depth and cfg.merging.pyra


def test_shipped_backbone_loads_with_a_clean_report_and_scores_its_recorded_source_accuracy():
    meta = read_checkpoint(str(SHIPPED))["meta"]
    cfg = load_config(DEMO).model
    assert meta["arch"] == {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                            "patch_size": cfg.patch_size, "img_size": cfg.img_size, "global_pool": cfg.global_pool}
    assert meta["classes"] == GLYPHS and not set("0123456789") & set(GLYPHS)

    # As the demo loads it: a pretrained file, its 40-class head dropped, only the trainable parts missing.
    merging = load_config(DEMO).merging.r
    model = demo_model(10, merging=merging, pyra=True)
    report = load_checkpoint(model, str(SHIPPED), kind="pretrained")
    assert report.kind == "pretrained" and report.dropped == ["head.bias", "head.weight"]
    assert not report.unexpected
    categories = param_categories(model)
    assert report.missing and {categories[k] for k in report.missing} == {"lora", "pyra", "head"}
    backbone = [k for k, _ in model.named_parameters() if categories[k] == "backbone"]
    assert report.loaded == len(backbone)

    # With its head: the recorded top-1 on the fixed generated evaluation batch.
    model = demo_model(len(GLYPHS), peft="none")
    report = load_checkpoint(model, str(SHIPPED), kind="finetuned")
    assert not report.missing and not report.unexpected
    recorded = meta["source_eval"]
    images, labels = make_batch(recorded["size"], seed=recorded["seed"])
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(normalize(images[i:i + 500])).argmax(1) for i in range(0, len(labels), 500)])
    top1 = 100.0 * (preds == labels).float().mean().item()
    assert abs(top1 - recorded["top1"]) <= 0.5, (top1, recorded)
    assert recorded["top1"] >= 90.0                     # 40 classes: chance is 2.5%
    # and weight/README.md states that number
    assert f"{recorded['top1']:.2f}" in (REPO / "weight" / "README.md").read_text()
    # a random backbone of the same shape is near chance there (the check above can fail)
    torch.manual_seed(0)
    random_model = demo_model(len(GLYPHS), peft="none").eval()
    with torch.no_grad():
        chance = (random_model(normalize(images[:500])).argmax(1) == labels[:500]).float().mean().item()
    assert 100.0 * chance < 10.0


def test_pretrain_script_runs_a_tiny_setting_and_reproduces_its_bytes(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "pretrain_demo_backbone.py"), "--steps", "3", "--batch-size", "8",
           "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--warmup-steps", "1", "--eval-size", "16",
           "--threads", "1", "--log-every", "1", "--save-every", "2"]
    outs = []
    for name in ("a.pth", "b.pth"):
        proc = subprocess.run(cmd + ["--out", str(tmp_path / name)], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outs.append(proc.stdout)
    assert "step 3/3" in outs[0] and "source-task top-1" in outs[0]
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
    meta = read_checkpoint(str(tmp_path / "a.pth"))["meta"]
    assert meta["recipe"]["steps"] == 3 and meta["source_eval"]["size"] == 16
    assert meta["recipe"]["recon_weight"] == 1.0            # the shipped recipe's auxiliary reconstruction loss
    assert read_checkpoint(str(tmp_path / "a.pth.step2"))["meta"]["step"] == 2
    model = create_model("vit", num_classes=10, peft="lora", img_size=32, embed_dim=32, depth=1, num_heads=2,
                         patch_size=4, global_pool="avg")
    report = load_checkpoint(model, str(tmp_path / "a.pth"))
    assert report.kind == "pretrained" and not report.unexpected
    assert {param_categories(model)[k] for k in report.missing} == {"lora", "head"}


def test_small_demo_backbone_is_shipped_small_and_scores_its_recorded_source_accuracy():
    sizes = dict(re.findall(r"model\.(embed_dim|num_heads)=(\d+)", (REPO / "scripts" / "demo_compare.sh").read_text()))
    assert SMALL.is_file() and SMALL.stat().st_size <= 2 * 2**20
    assert sha256(SMALL) == SMALL_SHA256 and SMALL_SHA256 in (REPO / "weight" / "README.md").read_text()
    probe = subprocess.run(["git", "check-ignore", "-q", str(SMALL)], cwd=REPO, capture_output=True)
    if probe.returncode in (0, 1):
        assert probe.returncode == 1, f"{SMALL} is git-ignored"
    ckpt = read_checkpoint(str(SMALL))
    meta, large = ckpt["meta"], read_checkpoint(str(SHIPPED))["meta"]
    assert meta["arch"] == {**large["arch"], "embed_dim": int(sizes["embed_dim"]), "num_heads": int(sizes["num_heads"])}
    assert meta["arch"]["embed_dim"] < large["arch"]["embed_dim"]
    assert {k: v for k, v in meta["recipe"].items() if k != "save_dtype"} == large["recipe"]   # the same recipe
    assert meta["recipe"]["save_dtype"] == "float16" and {t.dtype for t in ckpt["model"].values()} == {torch.float16}
    arch = dict(meta["arch"])
    model = create_model("vit", num_classes=10, peft="lora", **arch)
    report = load_checkpoint(model, str(SMALL), kind="pretrained")
    assert not report.unexpected and {param_categories(model)[k] for k in report.missing} == {"lora", "head"}
    model = create_model("vit", num_classes=len(GLYPHS), peft="none", **arch)
    load_checkpoint(model, str(SMALL), kind="finetuned")
    recorded = meta["source_eval"]
    images, labels = make_batch(recorded["size"], seed=recorded["seed"])
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(normalize(images[i:i + 500])).argmax(1) for i in range(0, len(labels), 500)])
    top1 = 100.0 * (preds == labels).float().mean().item()
    assert abs(top1 - recorded["top1"]) <= 0.5 and recorded["top1"] >= 90.0, (top1, recorded)
    assert f"{recorded['top1']:.2f}" in (REPO / "weight" / "README.md").read_text()


def test_demo_compare_runs_end_to_end_with_one_epoch_each(tmp_path):
    out, data = tmp_path / "runs", tmp_path / "data"
    env = dict(ENV, OUT=str(out), DATA_ROOT=str(data), ROUNDS="2", CURVE_R="8")
    # one epoch on the 200 validation digits, evaluated on them: the whole pipeline, a fraction of the time
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo_compare.sh"), "--curve", "train.epochs=1",
                           "data.train_split=val200", "data.eval_split=val200", "report.benchmark_seconds=0.05",
                           "report.speedup=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "compare.png").stat().st_size > 1000
    result = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["lora", "lora_tome_high", "lora_pyra_high", "small_lora"]
    small = rows["small_lora"]
    assert small["tokens"] == [65] * 5 and small["gflops"] < rows["lora"]["gflops"]
    # the verdict of its own numbers: each merged row against the small backbone, whatever they are
    verdicts = {v["row"]: v for v in result["verdicts"]}
    assert list(verdicts) == ["LoRA + ToMe high", "LoRA + PYRA high"]
    # one seed: no claim (None), unless the timing put the row slower than the small model: then it is not adverse
    assert all(v["small"] == "small backbone, LoRA, no merging" and
               v["adverse"] is (False if v["speed"] == "slower" else None) for v in verdicts.values())
    assert "Adverse compression" in proc.stdout and "one seed per row: the noise is unknown" in proc.stdout
    # --curve: ToMe and PYRA at CURVE_R besides high, the three rows above reused, the small model marked
    curve = {r["name"]: r for r in json.loads((out / "curve" / "curve.json").read_text())["rows"]}
    assert set(curve) == {"tome_r8", "pyra_r8", "uncompressed", "tome_r24-16-8-4", "pyra_r24-16-8-4",
                          "small: small_lora"}
    assert curve["small: small_lora"]["kind"] == "small" and curve["uncompressed"]["kind"] == "uncompressed"
    assert curve["tome_r24-16-8-4"]["accuracy"]["value"] == rows["lora_tome_high"]["top1"]     # last top-1
    assert (out / "curve" / "curve.png").stat().st_size > 1000
    plain, tome, pyra = rows["lora"], rows["lora_tome_high"], rows["lora_pyra_high"]
    assert plain["speedup"] == 1.0 and not any(plain["r"] or []) and plain["tokens"] == [65] * 5
    assert tome["r"] == pyra["r"] == [24, 16, 8, 4] and tome["tokens"] == pyra["tokens"] == [65, 41, 25, 17, 13]
    assert plain["gflops"] > 2 * tome["gflops"] and abs(pyra["gflops"] / tome["gflops"] - 1) < 0.01
    assert plain["trainable"] == tome["trainable"] < pyra["trainable"]
    assert all(r["epochs"] == 1 and 0 <= r["top1"] <= 100 for r in rows.values())
    table = (out / "compare.md").read_text()
    assert table in proc.stdout and len(re.findall(r"^\| (LoRA|small)", table, re.M)) == 4

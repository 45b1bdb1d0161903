"""eval.py on tiny checkpoints of the other reduction methods: FLOPs and speed-up against the same backbone without
reduction, and the method's name, as for ToMe (benchmark.py and collect_results.py: in their own test files)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import eval as eval_script
from lib.build import build_model
from lib.config import load_config
from models import trainable_state_dict
from models.checkpoint import OWN_FORMAT

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo/digits_random.yaml")
TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "peft.dim=4", "data.num_classes=10", "merging.pyra=false"]          # 4 x 4 patches
METHODS = {"fpet": ["merging.method=fpet", "merging.r=[8, 0]"],            # half of the 16 patches, in block 0
           "dtem": ["merging.method=dtem", "merging.r=[4, 2]"],
           "diffrate": ["merging.method=diffrate", "merging.r=null",
                        "merging.diffrate={prune_kept: [16, 10], merge_kept: [16, 6]}"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_eval_reports_flops_speedup_and_the_method(method, tmp_path, capsys):
    overrides = [*TINY, *METHODS[method]]
    torch.manual_seed(0)
    ckpt = tmp_path / "best.pth"
    torch.save({"format": OWN_FORMAT, "model": trainable_state_dict(build_model(load_config(CONFIG, overrides), 10)),
                "next_epoch": 1}, ckpt)
    out = tmp_path / "eval.json"
    assert eval_script.main(["--config", CONFIG, "--checkpoint", str(ckpt), *overrides, "--no-accuracy",
                             "--runs", "1", "--batch-size", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == method
    rows = {(r["setting"], r["lora"]): r for r in result["efficiency"]}
    assert set(rows) == {(s, lora) for s in ("merged", "no merging") for lora in ("unfolded", "folded")}
    for lora in ("unfolded", "folded"):
        merged, plain = rows[("merged", lora)], rows[("no merging", lora)]
        assert (merged["method"], plain["method"]) == (method, "none") and not any(plain["r"]) and any(merged["r"])
        assert 0 < merged["gflops"] < plain["gflops"] and merged["speedup"] > 0
    assert rows[("no merging", "unfolded")]["speedup"] == pytest.approx(1.0)   # the reference of the speed-ups
    printed = capsys.readouterr().out
    assert f"merged       {method:<10} unfolded" in printed and "no merging   none" in printed

"""Benchmark harness: efficiency arithmetic, fvcore counts by hand, and a tiny end-to-end run of every field."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.benchmark import count_flops, efficiency, matmul_peak, peak_memory_mb, sdpa_flop_jit
from models import create_model

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efficiency_known_case():
    # 1 GMAC per image = 2 GFLOP; 10 images/s = 20 GFLOP/s on a 40 GFLOP/s machine.
    assert efficiency(1e9, 10.0, 40e9) == pytest.approx(0.5)
    assert efficiency(17.64e9, 1.0, 2 * 17.64e9) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        efficiency(1e9, 1.0, 0.0)


class _Attend(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_flop_jit_counts_both_matmuls():
    from fvcore.nn import FlopCountAnalysis

    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    analysis = FlopCountAnalysis(_Attend(), (q, k, v)).set_op_handle(
        "aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False)
    # q·kᵀ: 2·3 heads × 5×7 scores × 4; attn·v: 2·3 × 5×6 outputs × 7.
    assert analysis.total() == 2 * 3 * 5 * 7 * 4 + 2 * 3 * 5 * 6 * 7


def _hand_count(dim: int, depth: int, patch: int, img: int, rank: int, classes: int) -> int:
    """fvcore's count of a plain ViT with LoRA on qkv, one image, multiply-adds (LayerNorm: 5 per element)."""
    patches = (img // patch) ** 2
    n = patches + 1
    conv = patches * dim * 3 * patch * patch
    linears = n * dim * (3 * dim + dim + 4 * dim) + n * 4 * dim * dim
    lora = n * dim * rank + n * rank * 3 * dim
    attention = n * n * 2 * dim          # q·kᵀ and attn·v over all heads
    norms = 2 * 5 * n * dim
    block = linears + lora + attention + norms
    return conv + depth * block + 5 * n * dim + dim * classes


@pytest.mark.parametrize("fold", [False, True])
def test_count_flops_tiny_vit_matches_hand_count(fold):
    dim, depth, heads, patch, img, rank, classes = 32, 2, 4, 8, 32, 4, 10
    model = create_model("vit", num_classes=classes, embed_dim=dim, depth=depth, num_heads=heads,
                         patch_size=patch, img_size=img, peft="lora", peft_dim=rank)
    expected = _hand_count(dim, depth, patch, img, rank, classes)
    if fold:
        from models import fold_lora

        fold_lora(model)
        n = (img // patch) ** 2 + 1
        expected -= depth * (n * dim * rank + n * rank * 3 * dim)
    assert count_flops(model, img) == expected


def test_matmul_peak_is_a_rate():
    small = matmul_peak(torch.device("cpu"), size=64, runs=2)
    assert small > 0 and math.isfinite(small)


def test_peak_memory_sees_a_large_allocation():
    def touch():
        buf = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, written
        del buf

    grown = peak_memory_mb(touch, torch.device("cpu"))
    assert 48 < grown < 200


TINY = ["--model", "vit", "--embed-dim", "32", "--depth", "12", "--num-heads", "2", "--patch-size", "16",
        "--img-size", "64", "--batch-size", "2", "--threads", "1", "--rounds", "2", "--runs", "1",
        "--train-runs", "1", "--warmup", "1", "--memory-steps", "1", "--peak-size", "128",
        "--settings", "pyra_high"]


def test_main_tiny_emits_every_field(tmp_path):
    out = tmp_path / "bench.json"
    report = _load_script().main([*TINY, "--json", str(out), "--profile", str(tmp_path / "prof")])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))

    machine = saved["machine"]
    for key in ("device_name", "threads", "torch_version", "peak_gflops"):
        assert machine[key]
    assert machine["threads"] == 1 and machine["peak_gflops"] > 0

    rows = {(r["setting"], r["folded"]): r for r in saved["results"]}
    assert set(rows) == {("plain", False), ("plain", True), ("pyra_high", False), ("pyra_high", True)}
    fields = ("setting", "folded", "images_per_s", "batch", "flops", "gflops", "params", "trainable",
              "ratio_to_plain", "train_step_s", "train_ratio", "peak_mem_mb", "efficiency")
    for (setting, folded), row in rows.items():
        assert all(f in row for f in fields)
        assert row["batch"] == 2
        for f in ("images_per_s", "flops", "gflops", "params", "trainable", "ratio_to_plain", "efficiency"):
            assert row[f] > 0, (setting, folded, f)
        assert row["gflops"] == pytest.approx(row["flops"] / 2 ** 30)
        per_round = [efficiency(row["flops"], row["batch"] / t, p * 1e9)
                     for t, p in zip(row["round_s"], machine["peak_gflops_precision_rounds"])]
        assert len(per_round) == 2 and row["efficiency"] == pytest.approx(sorted(per_round)[0] / 2
                                                                           + sorted(per_round)[1] / 2)
        train = ("train_step_s", "train_ratio", "peak_mem_mb")
        if folded:  # folding is for inference: the LoRA parameters are gone
            assert all(row[f] is None for f in train)
        else:
            assert all(row[f] > 0 for f in train), (setting, row)
    assert rows[("plain", False)]["ratio_to_plain"] == pytest.approx(1.0)
    assert rows[("plain", False)]["train_ratio"] == pytest.approx(1.0)
    # Merging removes work, PYRA adds its parameters, folding removes LoRA's.
    assert rows[("pyra_high", False)]["flops"] < rows[("plain", False)]["flops"]
    assert rows[("pyra_high", False)]["trainable"] > rows[("plain", False)]["trainable"]
    assert rows[("plain", True)]["params"] < rows[("plain", False)]["params"]
    profile = (tmp_path / "prof" / "profile_pyra_high_infer.txt").read_text()
    assert "aten::addmm" in profile and (tmp_path / "prof" / "profile_plain_train.txt").is_file()
    blocks = (tmp_path / "prof" / "profile_pyra_high_blocks.txt").read_text().splitlines()
    assert len(blocks) == 2 + 12 + 1 and blocks[2].split()[1] == "17->9"


def test_settings_always_include_the_reference():
    script = _load_script()
    assert script._settings(["pyra_high"]) == ["plain", "pyra_high"]
    assert script._settings(None) == list(script.SETTINGS)
    with pytest.raises(ValueError):
        script._settings(["tome_medium"])

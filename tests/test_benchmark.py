"""Benchmark harness: efficiency arithmetic, the two FLOP counters by hand, a tiny run of the harness with every
field of the record, and the README generator's round trip."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lib.build
import lib.config
from lib.benchmark import (
    count_flops,
    efficiency,
    flop_counts,
    linear_replay,
    matmul_peak,
    peak_memory_mb,
    sdpa_backends,
    sdpa_flop_jit,
    write_vtab_images,
)
from lib.config import DataConfig
from lib.data import build_dataset
from models import create_model
from models.backbones import MERGING_SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str = "benchmark"):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
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


def _hand_parts(dim: int, depth: int, patch: int, img: int, rank: int, classes: int) -> dict[str, int]:
    """The multiply-adds of ``_hand_count`` split by what each counter sees."""
    patches = (img // patch) ** 2
    n = patches + 1
    matmuls = (patches * dim * 3 * patch * patch + dim * classes
               + depth * (n * dim * 8 * dim + n * 4 * dim * dim + n * dim * rank + n * rank * 3 * dim))
    return dict(matmuls=matmuls, attention=depth * n * n * 2 * dim, norms=(2 * depth + 1) * 5 * n * dim)


def test_flop_counts_two_counters_and_the_hidden_attention():
    dim, depth, heads, patch, img, rank, classes = 32, 2, 4, 8, 32, 4, 10
    model = create_model("vit", num_classes=classes, embed_dim=dim, depth=depth, num_heads=heads,
                         patch_size=patch, img_size=img, peft="lora", peft_dim=rank)
    parts = _hand_parts(dim, depth, patch, img, rank, classes)
    counts = flop_counts(model, img)
    # fvcore: multiply-adds of everything but the fused CPU attention kernel (LayerNorm included).
    assert counts["fvcore_flops"] == parts["matmuls"] + parts["norms"]
    assert counts["attention_macs"] == parts["attention"]
    assert counts["fvcore_flops"] + counts["attention_macs"] == count_flops(model, img)
    # FlopCounterMode: two FLOPs per multiply-add, no LayerNorm, and it does not see the CPU fused kernel.
    assert not counts["torch_counts_attention"]
    assert counts["torch_flops"] == 2 * parts["matmuls"]


def test_linear_replay_times_exactly_the_models_gemms():
    dim, depth, heads, patch, img, rank, classes = 32, 2, 4, 8, 32, 4, 10
    model = create_model("vit", num_classes=classes, embed_dim=dim, depth=depth, num_heads=heads,
                         patch_size=patch, img_size=img, peft="lora", peft_dim=rank)
    model.train()
    parts = _hand_parts(dim, depth, patch, img, rank, classes)
    conv = (img // patch) ** 2 * dim * 3 * patch * patch
    result = linear_replay(model, batch_size=3, img_size=img, runs=2)
    assert result["linear_macs"] == 3 * (parts["matmuls"] - conv)    # every nn.Linear, LoRA's included
    assert result["linear_calls"] == depth * 6 + 1                     # qkv, LoRA down/up, proj, fc1, fc2; head
    assert 0 < result["linear_s"] and 0 < result["forward_s"] and 0 < result["linear_share"]
    assert "gemm_to_peak" not in result
    paired = linear_replay(model, batch_size=3, img_size=img, runs=2, peak_size=64)
    assert paired["gemm_to_peak"] > 0 and paired["forward_peak_flop"] > 0 and "also_s" not in paired


def test_linear_replay_also_replays_the_pyra_modules():
    from models.pyra import PYRA

    model = create_model("vit", num_classes=10, embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=32,
                         merging=[3, 2, 1], pyra=True)
    result = linear_replay(model, batch_size=2, img_size=32, runs=2, also=PYRA)
    assert result["also_calls"] == 3 and 0 < result["also_share"] < 1 and result["also_s"] > 0
    assert model.training and not any(m._forward_hooks for m in model.modules())   # the model is left as it was


def test_sdpa_backends_names_the_kernel_of_each_call():
    q = torch.randn(1, 2, 5, 8)
    assert sdpa_backends(lambda: [F.scaled_dot_product_attention(q, q, q) for _ in range(3)],
                         torch.device("cpu")) == ["flash (cpu)"] * 3
    assert sdpa_backends(lambda: (q @ q.transpose(-1, -2)).softmax(-1) @ q, torch.device("cpu")) == []


def test_harness_images_are_a_vtab_task_the_data_path_reads(tmp_path):
    write_vtab_images(tmp_path, "bench", 5, num_classes=3, size=(40, 30))
    dataset = build_dataset(DataConfig(root=str(tmp_path), task="bench"), "test", 24, is_train=False)
    assert len(dataset) == 5 and dataset.num_classes == 3
    image, label = dataset[4]
    assert image.shape == (3, 24, 24) and label == 1
    assert (tmp_path / "bench" / "train800val200.txt").is_file()


TINY = ["model.name=vit", "model.embed_dim=32", "model.depth=12", "model.num_heads=2", "model.patch_size=16",
        "model.img_size=64", "--threads", "1", "--rounds", "2", "--runs", "1", "--train-runs", "1",
        "--memory-steps", "1", "--peak-size", "128", "--workers", "1", "--e2e-image-size", "48"]


def _typed(value, types) -> bool:
    allowed = tuple(t for t in types if t is not None)
    if value is None:
        return None in types
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)


def test_main_tiny_emits_every_field_with_its_type(tmp_path):
    script = _load_script()
    out = tmp_path / "bench.json"
    report = script.main([*TINY, "--settings", "pyra_high", "--batch-sizes", "1", "2", "--train-batch-sizes", "2",
                          "--json", str(out), "--profile", str(tmp_path / "prof")])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    env = saved["env"]
    for key, types in script.ENV_FIELDS.items():
        assert _typed(env[key], types), (key, env[key])
    assert env["threads"] == 1 and env["device"] == "cpu" and env["precision"] == "fp32"
    assert env["torch"] == torch.__version__ and len(env["commit"].split("+")[0]) == 40
    assert all(len(loads) == 3 for loads in env["load_avg_rounds"].values())

    rows = {(r["label"], r["batch_size"]): r for r in saved["results"]}
    labels = ["plain", "plain folded", "pyra_high", "pyra_high folded"]
    assert set(rows) == {(label, bs) for label in labels for bs in (1, 2)}
    for (label, bs), row in rows.items():
        for key, types in script.ROW_FIELDS.items():
            assert _typed(row[key], types), (label, bs, key, row[key])
        assert row["images_per_s"] > 0 and row["end_to_end_images_per_s"] > 0
        assert row["fvcore_flops"] > 0 and row["torch_flops"] > 0 and row["attention_macs"] > 0
        assert row["flops"] == row["fvcore_flops"] + row["attention_macs"]
        assert row["gflops"] == pytest.approx(row["flops"] / 2 ** 30)
        assert row["sdpa_backends"] == ["flash (cpu)"] * 12
        assert len(row["peak_gflops_rounds"]) == len(row["round_s"]) == 2 and min(row["peak_gflops_rounds"]) > 0
        assert [sum(pair) / 2 for pair in row["peak_gflops_bracket_rounds"]] == pytest.approx(row["peak_gflops_rounds"])
        per_round = [efficiency(row["flops"], bs / t, p * 1e9)
                     for t, p in zip(row["round_s"], row["peak_gflops_rounds"])]
        assert row["efficiency"] == pytest.approx(sorted(per_round)[0] / 2 + sorted(per_round)[1] / 2)
        train = ("train_step_s", "train_ratio", "peak_mem_mb")
        if row["folded"] or bs == 1:  # folding is for inference (the LoRA parameters are gone); no training at 1
            assert all(row[f] is None for f in train)
        else:
            assert all(row[f] > 0 for f in train), (label, row)
        assert row["compile_s"] is None and row["attention"] == (None if label.startswith("plain") else "mask")
    for bs in (1, 2):   # each peak closes one timing and opens the next: 4 timings, 5 peaks per round
        for rnd in range(2):
            brackets = sorted(tuple(rows[(label, bs)]["peak_gflops_bracket_rounds"][rnd]) for label in labels)
            afters = {after for _, after in brackets}
            opening = [b for b, _ in brackets if b not in afters]
            assert len(opening) == 1 and len(afters) == 4, brackets   # one chain: first peak -> ... -> last
    for bs in (1, 2):   # the environment's per-round peak is the median of the peaks beside that round's timings
        beside = [rows[(label, bs)]["peak_gflops_rounds"] for label in labels]
        assert env["peak_gflops_precision_rounds"][str(bs)] == pytest.approx(
            [sorted(r[i] for r in beside)[1] / 2 + sorted(r[i] for r in beside)[2] / 2 for i in range(2)])
    assert rows[("plain", 2)]["train_ratio"] == pytest.approx(1.0)
    for bs in (1, 2):
        assert rows[("plain", bs)]["ratio_to_plain"] == pytest.approx(1.0)
        # Merging removes work, folding removes LoRA's.
        assert rows[("pyra_high", bs)]["fvcore_flops"] < rows[("plain", bs)]["fvcore_flops"]
        assert rows[("plain folded", bs)]["fvcore_flops"] < rows[("plain", bs)]["fvcore_flops"]
    assert saved["speedup_curve"]["pyra_high"]["batch_sizes"] == [1, 2]
    assert saved["speedup_curve"]["pyra_high"]["ratio_to_plain"] == [rows[("pyra_high", bs)]["ratio_to_plain"]
                                                                     for bs in (1, 2)]
    profile = (tmp_path / "prof" / "profile_pyra_high_infer.txt").read_text()
    assert "aten::addmm" in profile and (tmp_path / "prof" / "profile_plain_train.txt").is_file()
    gemm = (tmp_path / "prof" / "profile_pyra_high_gemm.txt").read_text()
    assert "nn.Linear calls replayed alone" in gemm and "share of the forward" in gemm
    assert "PYRA modules replayed alone" in gemm
    assert "PYRA" not in (tmp_path / "prof" / "profile_plain_gemm.txt").read_text()
    blocks = (tmp_path / "prof" / "profile_pyra_high_blocks.txt").read_text().splitlines()
    assert len(blocks) == 2 + 12 + 1 and blocks[2].split()[1] == "17->9"


def test_models_come_from_the_one_build_path_and_the_one_settings_table(monkeypatch):
    script = _load_script()
    assert not hasattr(script, "SETTINGS")
    for setting, overrides in MERGING_SETTINGS.items():
        args = script.parse_args([*TINY, "merging.prop_attn=false"])
        cfg = script.load_setting_config(args, setting)
        assert cfg.merging.r == overrides["merging.r"] and cfg.merging.pyra == overrides["merging.pyra"]
        assert cfg.merging.prop_attn is False
        assert cfg.model.name == "vit" and cfg.model.img_size == 64
    calls = []

    def spy(cfg, num_classes, pretrained=True):
        calls.append((cfg.merging.r, cfg.merging.pyra, num_classes, pretrained))
        return lib.build.build_model(cfg, num_classes, pretrained=pretrained)

    monkeypatch.setattr(script, "build_model", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # 64 px: the schedule is clamped to the 17 tokens
        model = script.build(script.parse_args(TINY), "pyra_high", torch.device("cpu"))
    assert calls == [("high", True, 100, False)] and model.r[:4] == [8, 4, 2, 1]


def test_settings_always_include_the_reference():
    script = _load_script()
    assert script._settings(["pyra_high"]) == ["none", "pyra_high"]
    assert script._settings(["plain", "tome_low"]) == ["none", "tome_low"]
    assert script._settings(None) == list(MERGING_SETTINGS)
    with pytest.raises(ValueError):
        script._settings(["tome_medium"])
    labels = [v.label for v in script._variants(script.parse_args([*TINY, "--attention", "mask", "feature",
                                                                   "--compile", "both"]),
                                                 ["none", "pyra_high"], has_lora=True)]
    assert labels[0] == "plain" and "pyra_high feature-attn folded compiled" in labels
    assert len(labels) == 2 * 2 + 2 * 2 * 2   # plain has no size bias, so one attention form
    args = script.parse_args([*TINY, "--fold", "yes", "--compile", "both", "frozen"])
    assert args.compile == ["off", "on", "frozen"]
    variants = script._variants(args, ["none"], has_lora=True)
    assert [v.label for v in variants] == ["plain", "plain folded", "plain folded compiled",
                                           "plain folded compiled frozen"]
    assert [(v.compiled, v.frozen) for v in variants[1:]] == [(False, False), (True, False), (True, True)]


@pytest.mark.benchmark
def test_compiled_rows_report_compile_time_apart(tmp_path):
    """torch.compile as a measured setting (slow: inductor compiles the tiny model)."""
    report = _load_script().main([*TINY, "--settings", "none", "--fold", "no", "--compile", "both", "frozen",
                                  "--no-train", "--no-e2e", "--batch-sizes", "1", "--json", str(tmp_path / "c.json")])
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"plain", "plain compiled", "plain compiled frozen"}
    for label in ("plain compiled", "plain compiled frozen"):
        assert rows[label]["compile_s"] > 0 and rows[label]["images_per_s"] > 0
    assert rows["plain compiled frozen"]["frozen"] and not rows["plain compiled"]["frozen"]
    assert rows["plain"]["compile_s"] is None and rows["plain"]["end_to_end_images_per_s"] is None


def _report_for_table() -> dict:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (label, folded) in enumerate([("plain", False), ("plain folded", True), ("pyra_high", False)]):
        r = torch.rand(12, generator=g).tolist()
        rows.append(dict(setting=label.split()[0], label=label, batch_size=8 * (i + 1), images_per_s=10 * r[0],
                         end_to_end_images_per_s=None if i == 1 else 9 * r[1], ratio_to_plain=1 + r[2],
                         fvcore_flops=int(17e9 * r[3]), torch_flops=int(34e9 * r[4]), attention_macs=int(1e9 * r[5]),
                         efficiency=r[6], train_step_s=None if folded else 4 * r[7],
                         train_ratio=None if folded else 1 + r[8], peak_mem_mb=None if folded else 1000 * r[9],
                         compile_s=None, spread=r[10], sdpa_backends=["flash (cpu)"] * 12))
    env = dict(device="cpu", device_name="CPU", threads=2, torch="2", timm="1", precision="fp32", allocator="glibc",
               commit="0" * 40, peak_gflops=100.0, peak_size=2048, load_avg_rounds={"8": [1.0, 2.0]},
               load_avg_start=1.0, load_avg_end=2.0)
    config = dict(model="vit_base_patch16_224_in21k", peft="lora", num_classes=100, img_size=224, rounds=3,
                  runs_per_round=3, end_to_end=True, e2e_workers=4, e2e_image_size=384, e2e_batches=3,
                  timestamp="2026-01-01T00:00:00", command="python scripts/benchmark.py --threads 2")
    return dict(env=env, config=config, results=rows)


def test_readme_generator_round_trips_a_json(tmp_path):
    table = _load_script("speed_table")
    report = _report_for_table()
    block = table.render(report)
    parsed = table.parse_table(block)
    assert len(parsed) == len(report["results"])
    for back, row in zip(parsed, report["results"]):
        for _header, key, spec, scale in table.COLUMNS:
            if row[key] is None or spec in ("s", "d"):
                assert back[key] == row[key], key
            else:   # as shown: rounded to the printed digits
                shown = table._cell(row, key, spec, scale)
                assert table._cell(back, key, spec, scale) == shown, (key, shown)
                digits = int(spec[1]) + (2 if spec.endswith("%") else 0)
                assert back[key] == pytest.approx(row[key], abs=scale * 0.51 * 10 ** -digits), key
    # Written into a README and checked against the JSON it came from.
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- speed:cpu:begin -->\nold\n<!-- speed:cpu:end -->\nrest\n", encoding="utf-8")
    source = tmp_path / "r.json"
    source.write_text(json.dumps(report), encoding="utf-8")
    assert "peak measured right before each timing" not in block   # these rows carry no per-row peaks
    paired = json.loads(json.dumps(report))
    for row in paired["results"]:
        row["peak_gflops_rounds"] = [100.0, 101.0]
    assert "efficiency against a peak measured right before each timing" in table.render(paired)
    for row in paired["results"]:
        row["peak_gflops_bracket_rounds"] = [[99.0, 101.0], [100.0, 102.0]]
    assert "efficiency against the mean of peaks measured right before and after each timing" in table.render(paired)
    assert table.main([str(source), "--block", "cpu", "--check", str(readme)]) == 1
    assert table.main([str(source), "--block", "cpu", "--write", str(readme)]) == 0
    assert table.main([str(source), "--block", "cpu", "--check", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# x\n") and text.endswith("rest\n") and table.read_block(text, "cpu") == block


REFERENCE_TINY = ["model.name=vit", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=16",
                  "model.img_size=64", "model.drop_path_rate=0.0", "peft.dropout=0.0"]


def test_straightforward_reference_is_the_same_model_with_the_same_trainable_parameters():
    script = _load_script("train_step_reference")
    args = script.parse_args(REFERENCE_TINY)
    cfg = lib.config.load_config(args.config, args.overrides)
    project = lib.build.build_model(cfg, 10, pretrained=False)
    with torch.no_grad():   # LoRA's up factor starts at zero: give it weight so the comparison sees LoRA
        for name, param in project.named_parameters():
            if "lora_up" in name:
                param.normal_(std=0.05)
    reference = script.build_reference(cfg, 10, project)
    assert not [type(m) for m in reference.modules() if type(m).__module__.startswith("models")]
    x = torch.randn(3, 3, 64, 64)
    project.eval(), reference.eval()
    assert torch.allclose(project(x), reference(x), atol=1e-5)
    trainable = lambda m: sorted(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(project) == trainable(reference) and sum(trainable(reference)) > 0


def test_straightforward_reference_timing_runs_and_reports(tmp_path):
    script = _load_script("train_step_reference")
    out = tmp_path / "ref.json"
    assert script.main([*REFERENCE_TINY, "--batch-size", "2", "--rounds", "2", "--runs", "1", "--threads", "1",
                        "--json", str(out), "--profile", str(tmp_path / "prof")]) == 0
    result = json.loads(out.read_text())
    for name in ("project", "reference"):
        assert "aten::mm" in (tmp_path / "prof" / f"profile_{name}.txt").read_text()
    assert result["project_step_s"] > 0 and result["reference_step_s"] > 0 and len(result["ratio_per_round"]) == 2
    with pytest.raises(ValueError, match="merging.pyra=True"):
        script.main([*REFERENCE_TINY, "merging.r=2", "merging.pyra=true"])


README_SPEED_BLOCKS = {"cpu-b8": "cpu_b8.json", "cpu-focus": "cpu_focus_b8.json", "cpu-pairs": "cpu_pairs_b8.json",
                       "cpu-curve": "cpu_curve.json", "cpu-compile": "cpu_compile_b8.json",
                       "cpu-attention": "cpu_attention_b8.json", "cpu-train-pairs": "cpu_train_pairs_b8.json"}


def test_readme_speed_blocks_are_generated_from_the_committed_records():
    table = _load_script("speed_table")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"<!-- speed:([\w-]+):begin -->", text)) == sorted(README_SPEED_BLOCKS)
    records = ROOT / "scripts" / "speed_records"
    for name, record in README_SPEED_BLOCKS.items():
        report = json.loads((records / record).read_text(encoding="utf-8"))
        assert table.read_block(text, name) == table.render(report), f"README block {name} != {record}"
    reference = json.loads((records / "cpu_train_reference_b8.json").read_text(encoding="utf-8"))
    for key in ("project_step_s", "reference_step_s"):   # the training-step comparison quotes its record
        assert f"{reference[key]:.3f} s" in text, key


def test_prepared_gpu_script_measures_what_the_gpu_record_needs(monkeypatch):
    """scripts/speed_gpu.sh (run where a GPU is lent): its commands parse and together cover ViT-B/16 LoRA,
    batch 256, fp32 and bf16, every setting, folded and not, both attention forms, compile on and off."""
    import subprocess

    gpu_script, env = str(ROOT / "scripts" / "speed_gpu.sh"), {"ECHO": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", gpu_script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line.split()[1:] for line in proc.stdout.splitlines()]
    assert len(commands) == 4 and all(c[0] == "scripts/benchmark.py" for c in commands)
    script = _load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = set()
    for command in commands:
        args = script.parse_args(command[1:])
        assert (args.device, args.batch_sizes, args.config) == ("cuda", [256], script.DEFAULT_CONFIG)
        variants = script._variants(args, script._settings(args.settings), has_lora=True)
        seen |= {(args.precision, v.setting, v.folded, v.compiled, v.attention) for v in variants}
        assert args.json.name.startswith("gpu_") and args.json.parent == Path("scripts/speed_records")
    assert {p for p, *_ in seen} == {"fp32", "bf16"}
    for precision in ("fp32", "bf16"):
        for setting in MERGING_SETTINGS:
            attention = None if setting == "none" else "mask"
            for folded, compiled in [(False, False), (True, False), (True, True)]:
                assert (precision, setting, folded, compiled, attention) in seen, (precision, setting, folded, compiled)
            if setting != "none":
                assert (precision, setting, False, False, "feature") in seen
    bad = subprocess.run(["bash", gpu_script, "fast"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'fast'" in bad.stderr

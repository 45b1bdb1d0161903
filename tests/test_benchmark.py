"""Speed tooling: efficiency arithmetic, the FLOP counters by hand, a tiny run of the harness with every field of
the record, the table generator's round trip and index, the GPU script's parts, and the tooling's size."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lib.build
from lib.benchmark import count_flops, sdpa_flop_jit
from lib.config import DataConfig
from lib.data import build_dataset
from models import create_model, fold_lora
from models.backbones import MERGING_SETTINGS, REDUCTION_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "scripts" / "speed_records"


def _load_script(name: str = "benchmark"):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_script()
table = _load_script("speed_table")


def test_efficiency_known_case():
    # 1 GMAC per image = 2 GFLOP; 10 images/s = 20 GFLOP/s on a 40 GFLOP/s machine.
    assert bench.efficiency(1e9, 10.0, 40e9) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bench.efficiency(1e9, 1.0, 0.0)


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


DIM, DEPTH, HEADS, PATCH, IMG, RANK, CLASSES = 32, 2, 4, 8, 32, 4, 10


def _tiny_lora():
    return create_model("vit", num_classes=CLASSES, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                        img_size=IMG, peft="lora", peft_dim=RANK)


def _hand_parts() -> dict[str, int]:
    """fvcore's multiply-adds of a plain ViT with LoRA on qkv, one image, split by what each counter sees."""
    patches = (IMG // PATCH) ** 2
    n = patches + 1
    matmuls = (patches * DIM * 3 * PATCH * PATCH + DIM * CLASSES
               + DEPTH * (n * DIM * 8 * DIM + n * 4 * DIM * DIM + n * DIM * RANK + n * RANK * 3 * DIM))
    return dict(matmuls=matmuls, attention=DEPTH * n * n * 2 * DIM, norms=(2 * DEPTH + 1) * 5 * n * DIM,
                lora=DEPTH * (n * DIM * RANK + n * RANK * 3 * DIM))


@pytest.mark.parametrize("fold", [False, True])
def test_count_flops_tiny_vit_matches_hand_count(fold):
    model, parts = _tiny_lora(), _hand_parts()
    expected = parts["matmuls"] + parts["attention"] + parts["norms"]
    if fold:
        fold_lora(model)
        expected -= parts["lora"]
    assert count_flops(model, IMG) == expected


def test_flop_counts_two_counters_and_the_hidden_attention():
    model, parts = _tiny_lora(), _hand_parts()
    counts = bench.flop_counts(model, IMG)
    # fvcore: multiply-adds of everything but the fused CPU attention kernel (LayerNorm included).
    assert counts["fvcore_flops"] == parts["matmuls"] + parts["norms"]
    assert counts["attention_macs"] == parts["attention"]
    assert counts["fvcore_flops"] + counts["attention_macs"] == count_flops(model, IMG)
    # FlopCounterMode: two FLOPs per multiply-add, no LayerNorm, and it does not see the CPU fused kernel.
    assert not counts["torch_counts_attention"]
    assert counts["torch_flops"] == 2 * parts["matmuls"]


def test_matmul_peak_is_a_rate():
    small = bench.matmul_peak(torch.device("cpu"), size=64, runs=2)
    assert small > 0 and math.isfinite(small)


def test_peak_memory_sees_a_large_allocation():
    def touch():
        buf = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, written
        del buf

    assert 48 < bench.peak_memory_mb(touch, torch.device("cpu")) < 200


def test_sdpa_backends_names_the_kernel_of_each_call():
    q = torch.randn(1, 2, 5, 8)
    assert bench.sdpa_backends(lambda: [F.scaled_dot_product_attention(q, q, q) for _ in range(3)],
                               torch.device("cpu")) == ["flash (cpu)"] * 3
    assert bench.sdpa_backends(lambda: (q @ q.transpose(-1, -2)).softmax(-1) @ q, torch.device("cpu")) == []


def test_harness_images_are_a_vtab_task_the_data_path_reads(tmp_path):
    bench.write_vtab_images(tmp_path, "bench", 5, num_classes=3, size=(40, 30))
    dataset = build_dataset(DataConfig(root=str(tmp_path), task="bench"), "test", 24, is_train=False)
    assert len(dataset) == 5 and dataset.num_classes == 3
    image, label = dataset[4]
    assert image.shape == (3, 24, 24) and label == 1
    assert (tmp_path / "bench" / "train800val200.txt").is_file()


TINY = ["model.name=vit", "model.embed_dim=32", "model.depth=12", "model.num_heads=2", "model.patch_size=16",
        "model.img_size=64", "--threads", "1", "--rounds", "2", "--runs", "1", "--train-runs", "1",
        "--peak-size", "128", "--workers", "1", "--e2e-image-size", "48"]


def _typed(value, types) -> bool:
    allowed = tuple(t for t in types if t is not None)
    if value is None:
        return None in types
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)


def test_main_tiny_emits_every_field_with_its_type(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main([*TINY, "--settings", "pyra_high", "--batch-sizes", "1", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    env = saved["env"]
    for key, types in bench.ENV_FIELDS.items():
        assert _typed(env[key], types), (key, env[key])
    assert env["threads"] == 1 and env["device"] == "cpu" and env["precision"] == "fp32"
    assert env["torch"] == torch.__version__ and len(env["commit"].split("+")[0]) == 40
    assert env["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert env["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert all(len(loads) == 3 for loads in env["load_avg_rounds"].values())
    assert all(len(p) == 2 and min(p) > 0 for p in env["peak_gflops_rounds"].values())   # one peak per round
    assert saved["config"]["e2e_workers"] == 1 and saved["config"]["e2e_timed_batches"] == 5   # 4 x 1 + 1

    rows = {(r["label"], r["batch_size"]): r for r in saved["results"]}
    labels = ["none", "none folded", "pyra_high", "pyra_high folded"]
    assert set(rows) == {(label, bs) for label in labels for bs in (1, 2)}
    for (label, bs), row in rows.items():
        for key, types in bench.ROW_FIELDS.items():
            assert _typed(row[key], types), (label, bs, key, row[key])
        assert row["images_per_s"] > 0 and row["end_to_end_images_per_s"] > 0
        assert row["fvcore_flops"] > 0 and row["torch_flops"] > 0 and row["attention_macs"] > 0
        assert row["flops"] == row["fvcore_flops"] + row["attention_macs"]
        assert row["gflops"] == pytest.approx(row["flops"] / 2 ** 30)
        assert row["sdpa_backends"] == ["flash (cpu)"] * 12
        peaks = env["peak_gflops_rounds"][str(bs)]
        per_round = sorted(bench.efficiency(row["flops"], bs / t, p * 1e9) for t, p in zip(row["round_s"], peaks))
        assert row["efficiency"] == pytest.approx((per_round[0] + per_round[1]) / 2)
        train = ("train_step_s", "train_ratio", "peak_mem_mb")
        if row["folded"]:  # folding is for inference (the LoRA parameters are gone)
            assert all(row[f] is None for f in train)
        else:
            assert all(row[f] > 0 for f in train), (label, row)
        assert row["compile_s"] is None and row["attention"] == (None if label.startswith("none") else "mask")
    for bs in (1, 2):
        assert rows[("none", bs)]["ratio_to_none"] == pytest.approx(1.0)
        assert rows[("none", bs)]["train_ratio"] == pytest.approx(1.0)
        # Merging removes work, folding removes LoRA's.
        assert rows[("pyra_high", bs)]["fvcore_flops"] < rows[("none", bs)]["fvcore_flops"]
        assert rows[("none folded", bs)]["fvcore_flops"] < rows[("none", bs)]["fvcore_flops"]
    assert saved["speedup_curve"]["pyra_high"]["batch_sizes"] == [1, 2]
    assert saved["speedup_curve"]["pyra_high"]["ratio_to_none"] == [rows[("pyra_high", bs)]["ratio_to_none"]
                                                                    for bs in (1, 2)]
    assert table.parse_table(table.render(saved))[0]["label"] == "none"


def test_models_come_from_the_one_build_path_and_the_one_settings_table(monkeypatch):
    for setting, overrides in MERGING_SETTINGS.items():
        args = bench.parse_args([*TINY, "merging.prop_attn=false"])
        cfg = bench.load_setting_config(args, setting)
        assert cfg.merging.r == overrides["merging.r"] and cfg.merging.pyra == overrides["merging.pyra"]
        assert cfg.merging.prop_attn is False
        assert cfg.model.name == "vit" and cfg.model.img_size == 64
    calls = []

    def spy(cfg, num_classes, pretrained=True):
        calls.append((cfg.merging.r, cfg.merging.pyra, num_classes, pretrained))
        return lib.build.build_model(cfg, num_classes, pretrained=pretrained)

    monkeypatch.setattr(bench, "build_model", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # 64 px: the schedule is clamped to the 17 tokens
        model = bench.build(bench.parse_args(TINY), "pyra_high", torch.device("cpu"))
    assert calls == [("high", True, 100, False)] and model.r[:4] == [8, 4, 2, 1]


def test_settings_always_include_the_reference_and_use_one_word_for_it():
    assert bench._settings(["pyra_high"]) == ["none", "pyra_high"]
    assert bench._settings(None) == list(MERGING_SETTINGS)
    with pytest.raises(ValueError):
        bench._settings(["plain"])
    labels = [v.label for v in bench._variants(bench.parse_args([*TINY, "--attention", "mask", "feature",
                                                                 "--compile", "both"]),
                                               ["none", "pyra_high"], has_lora=True)]
    assert labels[0] == "none" and "pyra_high feature-attn folded compiled" in labels
    assert len(labels) == 2 * 2 + 2 * 2 * 2   # "none" has no size bias, so one attention form
    args = bench.parse_args([*TINY, "--fold", "yes", "--compile", "both", "frozen"])
    assert args.compile == ["off", "on", "frozen"]
    variants = bench._variants(args, ["none"], has_lora=True)   # the reference is added in front
    assert [v.label for v in variants] == ["none", "none folded", "none folded compiled", "none folded compiled frozen"]


def test_reduction_methods_are_settings_timed_and_counted_like_tome(tmp_path):
    """Every REDUCTION_SETTINGS level is a setting <method>_<level> with its method; on the tiny backbone the FPET
    and DiffRate rows are timed against none in the same rounds and counted by both counters."""
    args = bench.parse_args(TINY)
    for method, levels in REDUCTION_SETTINGS.items():
        for level, overrides in levels.items():
            cfg = bench.load_setting_config(args, f"{method}_{level}")
            assert cfg.merging.method == method and f"{method}_{level}" in bench.SETTINGS
            assert cfg.merging.method_options == overrides.get(f"merging.{method}", {})
    assert bench._settings(None) == list(MERGING_SETTINGS)   # the default rows stay the paper's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # 64 px: the schedules are clamped to the 17 tokens
        report = bench.main([*TINY, "--settings", "fpet_high", "diffrate_low", "--batch-sizes", "1", "--fold", "no",
                             "--no-e2e", "--no-train", "--json", str(tmp_path / "m.json")])
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows) == ["none", "diffrate_low", "fpet_high"]
    for label in ("diffrate_low", "fpet_high"):
        row = rows[label]
        assert row["attention"] == "mask" and row["images_per_s"] > 0 and row["ratio_to_none"] > 0
        assert 0 < row["fvcore_flops"] < rows["none"]["fvcore_flops"]
        assert 0 < row["torch_flops"] < rows["none"]["torch_flops"] and row["attention_macs"] > 0


@pytest.mark.benchmark
def test_compiled_rows_report_compile_time_apart(tmp_path):
    """torch.compile as a measured setting, two compiled variants each after a dynamo reset (slow: inductor)."""
    report = bench.main([*TINY, "--settings", "none", "--fold", "no", "--compile", "both", "frozen",
                         "--no-train", "--no-e2e", "--batch-sizes", "1", "--json", str(tmp_path / "c.json")])
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"none", "none compiled", "none compiled frozen"}
    for label in ("none compiled", "none compiled frozen"):
        assert rows[label]["compile_s"] > 0 and rows[label]["images_per_s"] > 0
        # steady state: no timed batch recompiles (a recompile would take far longer than the median)
        assert max(rows[label]["round_s"]) < 0.5 * rows[label]["first_call_s"]
    assert rows["none"]["compile_s"] is None and rows["none"]["end_to_end_images_per_s"] is None


def _report_for_table() -> dict:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (label, folded) in enumerate([("none", False), ("none folded", True), ("pyra_high", False)]):
        r = torch.rand(12, generator=g).tolist()
        rows.append(dict(setting=label.split()[0], label=label, batch_size=8 * (i + 1), images_per_s=10 * r[0],
                         end_to_end_images_per_s=None if i == 1 else 9 * r[1], ratio_to_none=1 + r[2],
                         fvcore_flops=int(17e9 * r[3]), torch_flops=int(34e9 * r[4]), attention_macs=int(1e9 * r[5]),
                         efficiency=r[6], train_step_s=None if folded else 4 * r[7],
                         train_ratio=None if folded else 1 + r[8], peak_mem_mb=None if folded else 1000 * r[9],
                         compile_s=None, spread=r[10], sdpa_backends=["flash"] * 12))
    env = dict(device="cuda", device_name="GPU", threads=2, torch="2", timm="1", precision="bf16", commit="0" * 40,
               cuda="13.0", float32_matmul_precision="highest", cuda_matmul_allow_tf32=False, cudnn_allow_tf32=True,
               peak_gflops=100.0, peak_size=8192, load_avg_rounds={"8": [1.0, 2.0]})
    config = dict(model="vit_base_patch16_224_in21k", peft="lora", num_classes=100, img_size=224, rounds=3,
                  runs_per_round=3, end_to_end=True, e2e_workers=4, e2e_image_size=384, e2e_timed_batches=17,
                  timestamp="2026-01-01T00:00:00", command="python scripts/benchmark.py --device cuda")
    return dict(env=env, config=config, results=rows)


def test_table_generator_round_trips_a_record(tmp_path):
    report = _report_for_table()
    block = table.render(report)
    assert "TF32 matmul False / cuDNN True, float32 matmul precision highest" in block and "CUDA 13.0" in block
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
    # An index of a folder: written, checked, stale after a new record.
    (tmp_path / "gpu_a.json").write_text(json.dumps(report), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    assert table.main(["--index", str(tmp_path), "--check"]) == 1
    assert table.main(["--index", str(tmp_path)]) == 0
    assert table.main(["--index", str(tmp_path), "--check"]) == 0
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert f"## gpu_a\n\n{block}\n" in text and "`notes.txt`" in text
    (tmp_path / "gpu_b.json").write_text(json.dumps(report), encoding="utf-8")
    assert table.main(["--index", str(tmp_path), "--check"]) == 1


def test_committed_records_are_readable_and_their_readme_is_generated():
    for path in RECORDS.glob("*.json"):
        report = json.loads(path.read_text(encoding="utf-8"))
        if "results" in report:
            assert table.parse_table(table.render(report)), path.name
            assert not any(row["label"].startswith("plain") for row in report["results"]), path.name
    assert table.main(["--index", str(RECORDS), "--check"]) == 0


def test_gpu_script_parts_cover_the_gpu_records(monkeypatch):
    """scripts/speed_gpu.sh: every part's command parses; together they cover ViT-B/16 LoRA at batch 256 in fp32
    and bf16, every setting, folded and not, both attention forms, eager and compiled, and a batch curve."""
    gpu_script, env = str(ROOT / "scripts" / "speed_gpu.sh"), {"ECHO": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", gpu_script, "all"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line.split()[1:] for line in proc.stdout.splitlines()]
    assert len(commands) == 7 and all(c[0] == "scripts/benchmark.py" for c in commands)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen, batches = set(), set()
    for command in commands:
        args = bench.parse_args(command[1:])
        assert args.device == "cuda" and args.config == bench.DEFAULT_CONFIG and 256 in args.batch_sizes
        assert args.json.name == f"gpu_{args.json.stem[4:]}.json" and args.json.parent == Path("scripts/speed_records")
        batches |= set(args.batch_sizes)
        seen |= {(args.precision, v.setting, v.folded, v.compiled, v.attention)
                 for v in bench._variants(args, bench._settings(args.settings), has_lora=True)}
    assert {1, 8, 64, 256} <= batches
    for precision in ("fp32", "bf16"):
        for setting in MERGING_SETTINGS:
            attention = None if setting == "none" else "mask"
            for folded, compiled in [(False, False), (True, False), (True, True)]:
                assert (precision, setting, folded, compiled, attention) in seen, (precision, setting, folded, compiled)
            if setting != "none":
                assert (precision, setting, False, False, "feature") in seen
    one = subprocess.run(["bash", gpu_script, "compile-high-bf16"], env=env, capture_output=True, text=True)
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 1 and "--compile both" in one.stdout
    for bad in (["fast"], []):
        proc = subprocess.run(["bash", gpu_script, *bad], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "eager-bf16" in proc.stderr


def test_speed_tooling_fits_in_a_thousand_lines():
    names = ("bench", "speed", "train_step_reference")
    files = [p for d in (".", "lib", "models", "scripts", "data", "configs") for p in (ROOT / d).glob("*")
             if p.is_file() and any(n in p.name for n in names) and p.suffix in (".py", ".sh")]
    assert {p.relative_to(ROOT).as_posix() for p in files} >= {"lib/benchmark.py", "scripts/benchmark.py",
                                                               "scripts/speed_table.py", "scripts/speed_gpu.sh"}
    assert sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files) <= 1000


@pytest.mark.parametrize("setting", list(MERGING_SETTINGS))
def test_tome_and_pyra_settings_are_tome_whatever_the_base_config(setting):
    """A row named none / tome_* / pyra_* means ToMe's merging (or none) also over another method's config."""
    from lib.config import load_config

    cfg = load_config(ROOT / "configs/vit_b16/lora_fpet_high.yaml", bench.setting_overrides(setting),
                      model_checks=False)
    assert cfg.merging.method == "tome" and cfg.merging.pyra == MERGING_SETTINGS[setting]["merging.pyra"]
    assert cfg.merging.r == MERGING_SETTINGS[setting]["merging.r"]

"""collect_results.py --adverse (scripts/adverse.py) on synthetic run folders with known numbers."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_collect_results import _std, write_official, write_seed_run

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scripts_adverse", ROOT / "scripts" / "adverse.py")
adverse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adverse)
cr = adverse.cr

TASKS = {"cifar": 0.0, "eurosat": 20.0, "kitti": -10.0}     # one task per group: task offset
SMALL_SEEDS = [70.0, 70.5, 69.5]                            # small model, seed k: base + task offset


def write_exp(exp: Path, per_seed: list[float]) -> Path:
    for task, offset in TASKS.items():
        for seed, base in enumerate(per_seed):
            write_seed_run(exp, task, seed, best=base + offset, last=base + offset - 1)
    return exp


def averages(per_seed: list[float]) -> list[float]:
    """Per seed the mean of the three group means (one task each): base + mean of the offsets."""
    return [b + sum(TASKS.values()) / 3 for b in per_seed]


@pytest.fixture
def logs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "logs"
    return {
        "small": write_exp(root / "vit_s16" / "lora_none", SMALL_SEEDS),
        "tome": write_exp(root / "vit_b16" / "lora_tome_high", [65.0, 64.0, 65.5]),     # clearly below
        "pyra": write_exp(root / "vit_b16" / "lora_pyra_high", [73.0, 72.5, 73.5]),     # clearly above
        "noise": write_exp(root / "vit_b16" / "noise", [69.0, 71.0, 70.0]),              # same mean
        "slow": write_exp(root / "vit_l16" / "lora_tome_low", [60.0, 61.0, 60.5]),       # below but slower
    }


RATES = {"small": [100.0, 100.0, 100.0], "tome": [110.0, 105.0, 108.0], "pyra": [98.0, 101.0, 99.0],
         "noise": [120.0, 119.0, 121.0], "slow": [80.0, 85.0, 90.0]}


def fake_measure(order: list[str], seen: list):
    def measure(specs):
        seen.extend(specs)
        return [RATES[name] for name in order]
    return measure


def test_table_rows_group_means_speed_and_verdicts(logs: dict[str, Path]) -> None:
    order = ["small", "tome", "pyra", "noise", "slow"]
    seen: list = []
    table = adverse.adverse_table([str(logs[n]) for n in order[1:]], str(logs["small"]),
                                  measure=fake_measure(order, seen))
    rows = {r["dir"]: r for r in table["rows"]}
    assert [r["role"] for r in table["rows"]] == ["small"] + ["compressed"] * 4
    # every model is timed from its run's saved config, the small one first
    assert [s["config"] for s in seen] == [str(logs[n] / "cifar" / "seed0" / "config.yaml") for n in order]
    small = rows[str(logs["small"])]
    assert small["groups"]["Natural"]["value"] == pytest.approx(70.0)
    assert small["groups"]["Specialized"]["value"] == pytest.approx(90.0)
    assert small["groups"]["Structured"]["value"] == pytest.approx(60.0)
    assert small["groups"]["Average"]["value"] == pytest.approx(sum(averages(SMALL_SEEDS)) / 3)
    assert small["groups"]["Average"]["std"] == pytest.approx(_std(averages(SMALL_SEEDS)))
    assert small["ratio"] == 1.0 and small["images_per_s"] == 100.0

    tome = rows[str(logs["tome"])]
    assert tome["images_per_s"] == 108.0 and tome["ratio"] == pytest.approx(1.08) and tome["speed"] == "faster"
    assert tome["diff"] == pytest.approx((65.0 + 64.0 + 65.5) / 3 - 70.0)
    assert tome["p"] < 0.05 and tome["adverse"] is True and "adverse compression" in tome["verdict"]
    pyra = rows[str(logs["pyra"])]
    assert pyra["speed"] == "matched" and pyra["ratio"] == pytest.approx(0.99)       # one round faster
    assert pyra["adverse"] is False and pyra["verdict"] == "no: above the small model"
    noise = rows[str(logs["noise"])]
    assert noise["diff"] == pytest.approx(0.0) and noise["p"] > 0.05
    assert noise["adverse"] is False and noise["verdict"] == "no: within seed noise"
    slow = rows[str(logs["slow"])]
    assert slow["speed"] == "slower" and slow["adverse"] is False and "slower" in slow["verdict"]

    # the same Welch p as --compare gives for the mean of group means
    a, b = cr.summarize(logs["small"]), cr.summarize(logs["tome"])
    (row,) = [r for r in cr.compare(a, b)["best"] if r["key"] == "Average"]
    assert tome["p"] == pytest.approx(row["p"]) and tome["diff"] == pytest.approx(row["diff"])


def test_markdown_and_csv_cells(logs: dict[str, Path], tmp_path: Path) -> None:
    order = ["small", "tome", "noise"]
    table = adverse.adverse_table([str(logs[n]) for n in order[1:]], str(logs["small"]),
                                  measure=fake_measure(order, []), device="cpu", batch_size=32)
    paths = adverse.write_outputs(table, tmp_path / "out")
    md = paths["markdown"].read_text()
    line = next(x for x in md.splitlines() if x.startswith("| vit_b16/lora_tome_high"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    tome_avg = averages([65.0, 64.0, 65.5])
    assert cells[1] == "compressed"
    assert cells[5] == f"{sum(tome_avg) / 3:.2f} ± {_std(tome_avg):.2f} (n=3)*"     # * : 3 of the 19 tasks
    assert cells[6:9] == ["108.0", "1.08× (faster)", f"{(65.0 + 64.0 + 65.5) / 3 - 70.0:+.2f}"]
    assert cells[-1] == "**yes: adverse compression**"
    assert "batch 32" in md and "`cpu`" in md and "3 interleaved rounds" in md
    with open(paths["csv"]) as f:
        rows = {r["experiment"]: r for r in csv.DictReader(f)}
    assert rows["vit_b16/noise"]["adverse"] == "False" and rows["vit_b16/lora_tome_high"]["adverse"] == "True"
    assert rows["vit_s16/lora_none"]["verdict"] == "reference"
    assert float(rows["vit_s16/lora_none"]["natural"]) == pytest.approx(70.0)
    data = json.loads(paths["json"].read_text())
    assert data["rows"][1]["rates"] == RATES["tome"] and data["batch_size"] == 32


def test_official_output_folders_are_read_and_timed_as_their_config(logs: dict[str, Path], tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    stamps = [outputs / f"2024030{k}_101010_ViT-B_prompt_lora_8_compress_high_PYRA_LR_0.0001" for k in (1, 2)]
    for seed, stamp in enumerate(stamps):       # official tree: one output folder per seed; finished at epoch 99
        for dataset, task in (("cifar100", "cifar"), ("eurosat", "eurosat"), ("kitti", "kitti")):
            best = [60.0, 61.0][seed] + TASKS[task]
            write_official(stamp, dataset, [best - 5] * 10 + [best], seed=seed)
    official = ",".join(map(str, stamps))
    seen: list = []
    table = adverse.adverse_table([official], str(logs["small"]),
                                  measure=lambda specs: seen.extend(specs) or [[100.0] * 2, [104.0, 99.0]])
    row = table["rows"][1]
    assert row["groups"]["Natural"]["value"] == pytest.approx(60.5)
    assert row["groups"]["Average"]["per_seed"] == {0: pytest.approx(60.0 + 10 / 3), 1: pytest.approx(61 + 10 / 3)}
    assert row["speed"] == "faster" and row["adverse"] is True          # 60.5 + 3.33 vs 70 + 3.33, p < 0.05
    spec = seen[1]
    assert spec["config"] == str(ROOT / "configs" / "vit_b16" / "lora_none.yaml")
    assert spec["overrides"] == ["peft.dim=8", "merging.r=high", "merging.pyra=true"]
    assert spec["num_classes"] == 100                                     # cifar's head
    # the official config resolves to the PYRA-high ViT-B + LoRA 8 config of this project
    from lib.config import load_config

    cfg = load_config(spec["config"], spec["overrides"])
    ref = load_config(ROOT / "configs" / "vit_b16" / "lora_pyra_high.yaml")
    assert (cfg.model.name, cfg.peft.dim, cfg.merging.r, cfg.merging.pyra) == (ref.model.name, 8, "high", True)

    # no cfg to infer from: the error names the folder and the way out
    bare = outputs / "bare"
    write_official(bare, "dtd", [50.0])
    (bare / "dtd_lr-0.001_wd-0.0001" / "config.yaml").write_text("epochs: 1\ndata_set: dtd\n")
    with pytest.raises(ValueError, match=r"bare: no run config .* pass --timing-config .*bare=CONFIG"):
        adverse.adverse_table([str(bare)], str(logs["small"]), measure=lambda specs: [[1.0]] * len(specs))
    table = adverse.adverse_table([str(bare)], str(logs["small"]), measure=lambda specs: [[1.0]] * len(specs),
                                  timing_configs={str(bare): "vit_b16/lora_tome_high"})
    assert table["rows"][1]["timed_as"] == "--timing-config vit_b16/lora_tome_high"
    assert table["rows"][1]["verdict"] == "unknown: fewer than 2 seeds on a side"


def test_verdict_and_speed_rules() -> None:
    assert adverse.speed_stats([100, 100, 90], [100, 100, 100])["speed"] == "faster"          # median ratio 1
    assert adverse.speed_stats([95, 101, 96], [100, 100, 100])["speed"] == "matched"
    assert adverse.speed_stats([95, 99, 96], [100, 100, 100])["speed"] == "slower"
    below, small = [60.0, 61.0, 60.5], [70.0, 70.5, 69.5]
    assert adverse.verdict(below, small, "faster")["adverse"] is True
    assert adverse.verdict(below, small, "matched")["adverse"] is True
    assert adverse.verdict(below, small, "slower")["adverse"] is False
    assert adverse.verdict([60.0], small, "faster")["adverse"] is None
    assert adverse.verdict([], small, "faster")["verdict"] == "no accuracy to compare"


def test_cli_errors_are_one_line(logs: dict[str, Path], tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "collect_results.py")
    cases = [([str(logs["tome"])], "needs --small"),
             ([str(logs["tome"]), "--small", str(tmp_path / "nope")], "experiment folder not found"),
             ([str(logs["tome"]), "--small", str(logs["small"]), "--timing-config", "x"], "EXPERIMENT=CONFIG"),
             ([str(logs["tome"]), "--small", str(logs["small"]), "--timing-config", "other=vit_b16/lora_none"],
              "no experiment of that folder or name")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, script, "--adverse", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_times_tiny_models_in_one_process(tmp_path: Path) -> None:
    """End to end: runs whose config.yaml is a full config of this project (the demo's tiny ViT at half width,
    with ToMe, with PYRA), each built from it and timed for real in the rounds asked for."""
    from lib.config import load_config, save_config

    demo = ROOT / "configs" / "demo" / "digits.yaml"
    exps = {}
    for name, overrides in (("small", ["model.embed_dim=96", "model.num_heads=2", "merging.r=null",
                                       "merging.pyra=false"]),
                            ("tome", ["merging.pyra=false"]), ("pyra", [])):
        exp = write_exp(tmp_path / "logs" / name, SMALL_SEEDS)
        cfg = load_config(demo, overrides + ["model.pretrained="])
        for run in exp.glob("*/seed*"):
            save_config(cfg, run / "config.yaml")
        exps[name] = exp
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_results.py"), "--adverse",
                           str(exps["tome"]), str(exps["pyra"]), "--small", str(exps["small"]), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--batch-size", "8", "--rounds", "2",
                           "--min-seconds", "0"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "adverse.json").read_text())
    assert [len(r["rates"]) for r in data["rows"]] == [2, 2, 2]
    assert all(rate > 0 for r in data["rows"] for rate in r["rates"])
    assert data["rows"][0]["timed_as"].endswith("config.yaml")
    assert "# Adverse compression" in proc.stdout

"""scripts/collect_results.py on synthetic log trees written in train.py's format."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cr = _load_script("collect_results")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(exp: Path, task: str, curve: list[tuple[int, float]], finished: bool = True,
              n_parameters: int = 300_000, gflops: float = 5.0, throughput: float = 1000.0,
              final_best: float | None = None, epochs: int = 10, experiment: str = "") -> Path:
    """A task folder as train.py writes it: log.txt (JSON lines), efficiency.json, final.json if finished."""
    d = exp / task
    d.mkdir(parents=True)
    best = -1.0
    with open(d / "log.txt", "w") as f:
        for epoch, acc in curve:
            best = max(best, acc)
            f.write(json.dumps({"epoch": epoch, "train_lr": 1e-3, "train_loss": 1.0, "test_loss": 1.0,
                                "test_acc1": acc, "test_acc5": 99.0, "n_parameters": n_parameters,
                                "best_acc1": best, "epoch_time": 1.0}) + "\n")
    (d / "efficiency.json").write_text(json.dumps({
        "n_parameters": n_parameters, "total_parameters": 86_000_000, "flops": int(gflops * 2 ** 30),
        "gflops": gflops, "throughput": throughput, "throughput_batch": 64, "device": "cpu", "precision": "fp32",
        "tokens_per_layer": [65, 49]}))
    (d / "config.yaml").write_text(f"experiment: '{experiment}'\ntrain:\n  epochs: {epochs}\n")
    if finished:
        (d / "final.json").write_text(json.dumps({
            "best_acc1": best if final_best is None else final_best, "last_acc1": curve[-1][1],
            "epochs": epochs, "finished": True}))
    return d


@pytest.fixture
def partial_exp(tmp_path: Path) -> Path:
    """6 task folders over the 3 groups: one unfinished (caltech101), cifar under its paper spelling."""
    exp = tmp_path / "logs" / "vit_b16" / "lora_pyra_high"
    write_run(exp, "cifar100", [(0, 50.0), (9, 80.0)], n_parameters=370_000)       # best 80, last 80
    write_run(exp, "dtd", [(0, 40.0), (4, 61.0), (9, 60.0)], n_parameters=330_000)  # best 61, last 60
    write_run(exp, "caltech101", [(0, 90.0)], finished=False)                         # unfinished
    write_run(exp, "eurosat", [(0, 95.0), (9, 94.0)], throughput=900.0)             # best 95, last 94
    write_run(exp, "patch_camelyon", [(0, 85.0), (9, 83.0)])                         # best 85, last 83
    write_run(exp, "kitti", [(0, 70.0), (9, 72.0)], gflops=6.0)                      # best 72, last 72
    return exp


def test_load_run_reads_best_last_and_efficiency(partial_exp: Path) -> None:
    run = cr.load_run(partial_exp / "dtd")
    assert run["task"] == "dtd" and run["status"] == "finished"
    assert run["best_acc1"] == 61.0 and run["last_acc1"] == 60.0
    assert run["curve"] == [(0, 40.0), (4, 61.0), (9, 60.0)]
    assert run["epochs_done"] == 10 and run["epochs_total"] == 10
    assert run["n_parameters"] == 330_000 and run["gflops"] == 5.0 and run["throughput"] == 1000.0

    # final.json is authoritative for best (e.g. if the log was trimmed); the alias spelling is canonicalised.
    alias = write_run(partial_exp.parent / "other", "oxford_pet", [(0, 50.0)], final_best=55.0)
    run = cr.load_run(alias)
    assert run["task"] == "oxford_iiit_pet" and run["best_acc1"] == 55.0

    unfinished = cr.load_run(partial_exp / "caltech101")
    assert unfinished["status"] == "unfinished" and unfinished["best_acc1"] == 90.0


def test_load_run_skips_malformed_log_lines(tmp_path: Path) -> None:
    d = write_run(tmp_path / "exp", "svhn", [(0, 10.0), (1, 20.0)], finished=False)
    with open(d / "log.txt", "a") as f:
        f.write('{"epoch": 2, "test_ac')   # a crash mid-write
    run = cr.load_run(d)
    assert run["best_acc1"] == 20.0 and run["last_acc1"] == 20.0
    assert any("not JSON" in w for w in run["warnings"])


def test_group_means_hand_computed() -> None:
    per_task = {"cifar100": 80.0, "dtd": 60.0, "eurosat": 95.0, "patch_camelyon": 85.0, "kitti": 72.0,
                "svhn": None}
    gm = cr.group_means(per_task)
    assert gm["Natural"]["value"] == pytest.approx(70.0)
    assert (gm["Natural"]["n"], gm["Natural"]["total"], gm["Natural"]["complete"]) == (2, 7, False)
    assert gm["Specialized"]["value"] == pytest.approx(90.0)
    assert gm["Structured"]["value"] == pytest.approx(72.0)
    assert gm["Average"]["value"] == pytest.approx((70.0 + 90.0 + 72.0) / 3)
    assert gm["Average"]["complete"] is False
    assert gm["All"]["value"] == pytest.approx((80 + 60 + 95 + 85 + 72) / 5) and gm["All"]["n"] == 5

    only_natural = cr.group_means({"dtd": 50.0})
    assert only_natural["Specialized"]["value"] is None and only_natural["Structured"]["value"] is None
    assert only_natural["Average"]["value"] == pytest.approx(50.0) and only_natural["Average"]["n"] == 1


def test_group_means_complete_average_is_mean_of_group_means() -> None:
    values = {t: float(i) for i, t in enumerate(cr.TASK_ORDER)}
    gm = cr.group_means(values)
    nat, spe, stru = (sum(values[t] for t in ts) / len(ts) for ts in cr.VTAB_GROUPS.values())
    assert all(gm[k]["complete"] for k in cr.GROUP_KEYS)
    assert gm["Average"]["value"] == pytest.approx((nat + spe + stru) / 3)
    assert gm["All"]["value"] == pytest.approx(sum(values.values()) / 19)
    assert gm["Average"]["value"] != pytest.approx(gm["All"]["value"])  # the two averages differ


def test_summarize_flags_missing_and_unfinished(partial_exp: Path) -> None:
    s = cr.summarize(partial_exp)
    assert s["name"] == "vit_b16/lora_pyra_high"  # the path below logs/ (no config.yaml here)
    assert s["unfinished"] == ["caltech101"]
    assert len(s["missing"]) == 13 and "cifar" not in s["missing"] and "svhn" in s["missing"]
    # Unfinished runs are left out of the means by default.
    assert s["best"]["Natural"]["value"] == pytest.approx((80 + 61) / 2)
    assert s["last"]["Natural"]["value"] == pytest.approx((80 + 60) / 2)
    assert s["best"]["Average"]["value"] == pytest.approx(((80 + 61) / 2 + (95 + 85) / 2 + 72) / 3)
    assert s["last"]["All"]["value"] == pytest.approx((80 + 60 + 94 + 83 + 72) / 5)
    assert s["n_parameters"] == pytest.approx((370_000 + 330_000 + 4 * 300_000) / 6)
    assert s["throughput"] == pytest.approx((5 * 1000 + 900) / 6)
    assert s["gflops"] == pytest.approx((5 * 5 + 6) / 6)

    s = cr.summarize(partial_exp, include_unfinished=True)
    assert s["best"]["Natural"]["value"] == pytest.approx((80 + 61 + 90) / 3)


def test_collect_writes_tables_and_plots(partial_exp: Path, tmp_path: Path) -> None:
    full = tmp_path / "logs" / "vit_b16" / "lora_tome_high"
    for i, task in enumerate(cr.TASK_ORDER):
        write_run(full, task, [(0, 50.0 + i), (9, 60.0 + i)], throughput=1400.0)
    out = tmp_path / "report"
    result = cr.collect([partial_exp, full], out=out, names=["PYRA", "ToMe"])

    md = (out / "results.md").read_text()
    assert md == result["markdown"]
    pyra_row = next(line for line in md.splitlines() if line.startswith("| PYRA |"))
    cells = [c.strip() for c in pyra_row.strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[4].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["Cifar100"] == "80.00" and row["Caltech101"] == "90.00†" and row["SVHN"] == "–"
    assert row["Natural"] == "70.50*" and row["Structured"] == "72.00*"
    assert row["Average (groups)"] == f"{((80 + 61) / 2 + 90 + 72) / 3:.2f}*"
    tome_row = next(line for line in md.splitlines() if line.startswith("| ToMe |"))
    assert "*" not in tome_row and "–" not in tome_row
    assert "caltech101 unfinished (1/10 epochs logged)" in md

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["experiment"] for r in rows] == ["PYRA", "ToMe"]
    assert float(rows[0]["Natural_best"]) == pytest.approx(70.5) and rows[0]["Natural_complete"] == "False"
    assert rows[0]["svhn_best"] == "" and rows[0]["unfinished"] == "caltech101"
    nat = [60.0 + i for i in range(7)]
    assert float(rows[1]["Natural_last"]) == pytest.approx(sum(nat) / 7)
    assert float(rows[1]["throughput"]) == pytest.approx(1400.0)

    with open(out / "results_long.csv") as f:
        long = list(csv.DictReader(f))
    assert len(long) == 2 * 19
    status = {(r["experiment"], r["task"]): r["status"] for r in long}
    assert status[("PYRA", "caltech101")] == "unfinished" and status[("PYRA", "svhn")] == "missing"
    assert status[("ToMe", "svhn")] == "finished"

    for name in ("acc_curves.png", "acc_vs_throughput.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        with Image.open(out / name) as img:
            img.verify()
            assert img.size[0] > 100 and img.size[1] > 100


def test_cli_default_out_is_first_experiment(partial_exp: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_results.py"), str(partial_exp),
                           "--no-plots"], capture_output=True, text=True, cwd=partial_exp.parent, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| vit_b16/lora_pyra_high |" in proc.stdout
    assert (partial_exp / "results.md").is_file() and (partial_exp / "results.csv").is_file()
    assert not (partial_exp / "acc_curves.png").exists()


def test_experiment_name_from_saved_config(tmp_path: Path) -> None:
    exp = tmp_path / "somewhere"
    write_run(exp, "dtd", [(0, 1.0)], experiment="vit_s16/lora_none")
    assert cr.summarize(exp)["name"] == "vit_s16/lora_none"


def test_wrong_folder_level_gets_a_hint(partial_exp: Path, capsys) -> None:
    logs = partial_exp.parent.parent
    cr.collect([logs], out=logs / "r", plots=False)
    assert f"experiment folders below it: {partial_exp}" in capsys.readouterr().err
    cr.collect([partial_exp / "dtd"], out=logs / "r", plots=False)
    assert "is a task folder: pass its parent" in capsys.readouterr().err


def test_cli_errors_are_reported(tmp_path: Path) -> None:
    assert cr.main([str(tmp_path / "nope")]) == 2
    (tmp_path / "a").mkdir()
    assert cr.main([str(tmp_path / "a"), "--names", "x", "y", "--no-plots"]) == 2


def test_demo_task_outside_vtab_is_listed_without_vtab_columns(tmp_path: Path) -> None:
    exp = tmp_path / "demo"
    write_run(exp, "digits", [(0, 30.0), (1, 60.0)])
    result = cr.collect([exp], plots=False)
    summary: dict = result["summaries"][0]
    assert summary["extra_tasks"] == ["digits"] and summary["runs"]["digits"]["best_acc1"] == 60.0
    header = result["markdown"].splitlines()[4]
    assert "digits" in header and "Cifar100" not in header and "Natural" not in header

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


# ------------------------------------------------------------------------------------ seeds and noise
def _std(values: list[float]) -> float:
    """Sample standard deviation, written out (independent of the script's statistics)."""
    m = sum(values) / len(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def write_seed_run(exp: Path, task: str, seed: int, best: float, last: float, epochs: int = 10,
                   logged_to: int | None = None, final: bool = True, throughput: float = 1000.0,
                   selected: float | None = None) -> Path:
    """A run as train.py writes it now: <exp>/<task>/seed<k>/ (log reaching best then last)."""
    d = exp / task / f"seed{seed}"
    d.mkdir(parents=True)
    end = epochs - 1 if logged_to is None else logged_to
    lines = [{"epoch": 0, "test_acc1": best, "best_acc1": best}, {"epoch": end, "test_acc1": last,
                                                                   "best_acc1": max(best, last)}]
    (d / "log.txt").write_text("".join(json.dumps({"train_lr": 1e-3, "train_loss": 1.0, "test_loss": 1.0,
                                                   "test_acc5": 99.0, "n_parameters": 1000, **r}) + "\n"
                                       for r in lines))
    (d / "config.yaml").write_text(f"experiment: ''\nseed: {seed}\ntrain:\n  epochs: {epochs}\n")
    (d / "efficiency.json").write_text(json.dumps({"n_parameters": 1000, "gflops": 1.0, "throughput": throughput}))
    if final:
        (d / "final.json").write_text(json.dumps({"best_acc1": max(best, last), "last_acc1": last,
                                                  "epochs": epochs, "finished": True}))
    if selected is not None:
        (d / "selected.json").write_text(json.dumps({"finished": True, "test": {"acc1": selected},
                                                     "chosen": {"optim.pyra_lr": "1e-4"}}))
    return d


# task -> per seed (best, last, selected)
SEEDED = {
    "cifar": [(80.0, 79.0, 78.0), (82.0, 80.0, 79.5), (81.0, 81.0, 80.0)],
    "dtd": [(60.0, 59.0, 58.0), (64.0, 62.0, 61.0), (62.0, 61.0, 59.0)],
    "eurosat": [(95.0, 94.0, 93.0), (96.0, 96.0, 95.0), (94.0, 93.0, 92.5)],
    "kitti": [(70.0, 70.0, 69.0), (75.0, 72.0, 71.0), (72.0, 71.0, 70.0)],
}


@pytest.fixture
def seeded_exp(tmp_path: Path) -> Path:
    exp = tmp_path / "logs" / "pyra"
    for task, per_seed in SEEDED.items():
        for seed, (best, last, sel) in enumerate(per_seed):
            write_seed_run(exp, task, seed, best, last, selected=sel, throughput=1000.0 + 10 * seed)
    return exp


def test_task_mean_std_n_over_seeds(seeded_exp: Path) -> None:
    s = cr.summarize(seeded_exp)
    assert s["seeds"] == [0, 1, 2] and s["unfinished"] == []
    for task, per_seed in SEEDED.items():
        entry = s["runs"][task]
        for i, metric in enumerate(("best", "last", "selected")):
            values = [v[i] for v in per_seed]
            assert entry[metric]["n"] == 3
            assert entry[metric]["mean"] == pytest.approx(sum(values) / 3)
            assert entry[metric]["std"] == pytest.approx(_std(values))
    assert s["runs"]["cifar"]["selected_acc1"] == pytest.approx((78.0 + 79.5 + 80.0) / 3)


def test_group_mean_std_over_seeds(seeded_exp: Path) -> None:
    s = cr.summarize(seeded_exp)
    groups = {"Natural": ["cifar", "dtd"], "Specialized": ["eurosat"], "Structured": ["kitti"]}
    for i, metric in enumerate(("best", "last", "selected")):
        per_seed = {g: [sum(SEEDED[t][k][i] for t in ts) / len(ts) for k in range(3)] for g, ts in groups.items()}
        for g in groups:
            assert s[metric][g]["value"] == pytest.approx(sum(per_seed[g]) / 3)
            assert s[metric][g]["std"] == pytest.approx(_std(per_seed[g])) and s[metric][g]["n_seeds"] == 3
        average = [sum(per_seed[g][k] for g in groups) / 3 for k in range(3)]
        assert s[metric]["Average"]["value"] == pytest.approx(sum(average) / 3)
        assert s[metric]["Average"]["std"] == pytest.approx(_std(average))
        all_tasks = [sum(SEEDED[t][k][i] for t in SEEDED) / 4 for k in range(3)]
        assert s[metric]["All"]["value"] == pytest.approx(sum(all_tasks) / 3)
        assert s[metric]["All"]["std"] == pytest.approx(_std(all_tasks))
    # Throughput error bar: std over seeds of the per-seed mean throughput.
    assert s["throughput"] == pytest.approx(1010.0) and s["throughput_std"] == pytest.approx(_std([1000, 1010, 1020]))


def test_group_std_uses_seeds_every_task_has(tmp_path: Path) -> None:
    exp = tmp_path / "e"
    write_seed_run(exp, "cifar", 0, 80.0, 80.0)
    write_seed_run(exp, "cifar", 1, 84.0, 84.0)
    write_seed_run(exp, "cifar", 2, 90.0, 90.0)
    write_seed_run(exp, "dtd", 0, 60.0, 60.0)
    write_seed_run(exp, "dtd", 1, 50.0, 50.0)
    s = cr.summarize(exp)
    nat = s["best"]["Natural"]
    assert nat["value"] == pytest.approx(((80 + 84 + 90) / 3 + (60 + 50) / 2) / 2)   # mean of the task means
    assert nat["n_seeds"] == 2 and nat["per_seed"] == {0: 70.0, 1: 67.0}
    assert nat["std"] == pytest.approx(_std([70.0, 67.0]))


def test_markdown_shows_three_accuracies_side_by_side(seeded_exp: Path) -> None:
    md = cr.collect([seeded_exp], plots=False, names=["P"])["markdown"]
    assert "## Validation-selected test top-1" in md
    values = [v[0] for v in SEEDED["cifar"]]
    best = f"{sum(values) / 3:.2f} ± {_std(values):.2f} (n=3)"
    row = next(line for line in md.splitlines() if line.startswith("| Cifar100 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    sel = [v[2] for v in SEEDED["cifar"]]
    last = [v[1] for v in SEEDED["cifar"]]
    assert cells == ["Cifar100", best, f"{sum(last) / 3:.2f} ± {_std(last):.2f} (n=3)",
                     f"{sum(sel) / 3:.2f} ± {_std(sel):.2f} (n=3)", "0 1 2"]
    assert "sample standard deviation" in md


def test_finished_when_log_reaches_last_epoch_without_final_json(tmp_path: Path) -> None:
    exp = tmp_path / "e"
    write_seed_run(exp, "dtd", 0, 60.0, 62.0, final=False)                 # logged epoch 9 of 10: finished
    write_seed_run(exp, "dtd", 1, 50.0, 52.0, final=False, logged_to=5)    # epoch 5 of 10: unfinished
    write_seed_run(exp, "kitti", 0, 70.0, 71.0, final=False, logged_to=5)
    s = cr.summarize(exp)
    assert cr.load_run(exp / "dtd" / "seed0")["status"] == "finished"
    assert cr.load_run(exp / "dtd" / "seed1")["status"] == "unfinished"
    assert s["runs"]["dtd"]["best"]["n"] == 1 and s["runs"]["dtd"]["best_acc1"] == 62.0
    assert s["unfinished_runs"] == [("dtd", 1), ("kitti", 0)]
    assert s["best"]["Structured"]["value"] is None                      # unfinished: left out of the means
    md = cr.render_markdown([s])
    assert "dtd seed 1 unfinished (6/10 epochs logged)" in md and "kitti unfinished (6/10 epochs logged)" in md


def test_compare_flags_differences_within_seed_noise(tmp_path: Path) -> None:
    from scipy import stats

    a, b = tmp_path / "a", tmp_path / "b"
    data = {  # task: (A per seed, B per seed)
        "cifar": ([80.0, 81.0, 82.0], [80.5, 82.5, 81.0]),      # overlapping: within noise
        "dtd": ([60.0, 60.5, 61.0], [66.0, 66.5, 67.5]),        # clearly better
        "kitti": ([70.0], [72.0]),                              # one seed each: noise unknown
    }
    for task, (va, vb) in data.items():
        for seed, v in enumerate(va):
            write_seed_run(a, task, seed, v, v)
        for seed, v in enumerate(vb):
            write_seed_run(b, task, seed, v, v)
    result = cr.collect([], out=tmp_path / "r", plots=False, compare_pair=[a, b])
    rows = {r["key"]: r for r in result["compare"]["best"]}
    for task in ("cifar", "dtd"):
        va, vb = data[task]
        expected = stats.ttest_ind(vb, va, equal_var=False)
        assert rows[task]["diff"] == pytest.approx(sum(vb) / 3 - sum(va) / 3)
        assert rows[task]["p"] == pytest.approx(expected.pvalue)
        assert rows[task]["t"] == pytest.approx(expected.statistic)
    assert rows["cifar"]["p"] >= 0.05 and rows["cifar"]["verdict"] == "within seed noise"
    assert rows["dtd"]["p"] < 0.05
    assert rows["dtd"]["verdict"] == f"{result['summaries'][1]['name']} > {result['summaries'][0]['name']}"
    assert rows["kitti"]["p"] is None and rows["kitti"]["verdict"] == "noise unknown (n < 2)"
    assert rows["kitti"]["diff"] == pytest.approx(2.0)
    # Natural per seed: cifar and dtd have seeds 0-2 on both sides.
    nat_a = [(data["cifar"][0][k] + data["dtd"][0][k]) / 2 for k in range(3)]
    nat_b = [(data["cifar"][1][k] + data["dtd"][1][k]) / 2 for k in range(3)]
    assert rows["Natural"]["p"] == pytest.approx(stats.ttest_ind(nat_b, nat_a, equal_var=False).pvalue)
    compare_md = (tmp_path / "r" / "compare.md").read_text()
    assert "Welch's t-test" in compare_md and "p < 0.05" in compare_md
    assert "within seed noise" in result["markdown"]
    with open(tmp_path / "r" / "compare.csv") as f:
        assert {r["key"] for r in csv.DictReader(f)} >= {"cifar", "dtd", "kitti", "Natural", "Average"}


def test_welch_edge_cases() -> None:
    assert cr.welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
    assert cr.welch([1.0, 1.0], [2.0, 2.0])["p"] == 0.0
    assert cr.welch([1.0], [2.0, 3.0])["p"] is None


OFFICIAL_ARGS = {  # a subset of the official train.py's argparse namespace, as yaml.safe_dump writes it
    "batch_size": 32, "cfg": "experiments/LoRA/ViT-B_prompt_lora_8.yaml", "data_path": "./data/vtab-1k/cifar100",
    "direct_resize": True, "epochs": 100, "lr": 0.001, "merging_schedule": "high", "no_aug": True,
    "output_dir": "outputs/x", "pyra": True, "pyra_lr": 0.0001, "seed": 0, "token_merging": True,
    "val_interval": 10, "weight_decay": 0.0001,
}


def write_official(stamp_dir: Path, dataset: str, accs: list[float], seed: int = 0, epochs: int = 100) -> Path:
    """<stamp>/<dataset>_lr-0.001_wd-0.0001/ with the official log.txt and config.yaml."""
    import yaml

    d = stamp_dir / f"{dataset}_lr-0.001_wd-0.0001"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({**OFFICIAL_ARGS, "data_set": dataset, "seed": seed,
                                                   "epochs": epochs, "data_path": f"./data/vtab-1k/{dataset}"},
                                                  default_flow_style=False))
    epochs_logged = [e for e in range(epochs) if e % 10 == 0 or e == epochs - 1][:len(accs)]
    with open(d / "log.txt", "w") as f:
        for epoch, acc in zip(epochs_logged, accs):
            f.write(json.dumps({"train_lr": 1e-3, "train_loss": 0.5, "test_loss": 0.7, "test_acc1": acc,
                                "test_acc5": 99.0, "epoch": epoch, "n_parameters": 296_548}) + "\n")
    return d


def test_official_output_tree(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    s0 = outputs / "20240301_101010_ViT-B_prompt_lora_8_compress_high_PYRA_LR_0.0001"
    s1 = outputs / "20240302_101010_ViT-B_prompt_lora_8_compress_high_PYRA_LR_0.0001"
    full = [50.0 + i for i in range(11)]                       # epochs 0, 10, ..., 90, 99: finished
    write_official(s0, "cifar100", full)
    write_official(s0, "oxford_pet", [80.0, 85.0, 84.0])       # epochs 0, 10, 20: unfinished
    write_official(s0, "clevr_count", [30.0] * 10 + [40.0])
    write_official(s1, "cifar100", [52.0 + i for i in range(11)], seed=1)

    run = cr.load_run(s0 / "cifar100_lr-0.001_wd-0.0001")
    assert (run["task"], run["seed"], run["kind"], run["status"]) == ("cifar", 0, "official", "finished")
    assert run["best_acc1"] == 60.0 and run["last_acc1"] == 60.0 and run["epochs_total"] == 100
    assert run["n_parameters"] == 296_548 and run["throughput"] is None
    pets = cr.load_run(s0 / "oxford_pet_lr-0.001_wd-0.0001")
    assert pets["task"] == "oxford_iiit_pet" and pets["status"] == "unfinished" and pets["epochs_done"] == 21

    s = cr.summarize(s0)
    assert set(s["runs"]) == {"cifar", "oxford_iiit_pet", "clevr_count"}
    assert s["unfinished"] == ["oxford_iiit_pet"]
    assert s["best"]["Natural"]["value"] == 60.0 and s["best"]["Structured"]["value"] == 40.0

    both = cr.summarize(f"{s0},{s1}", name="official")            # two seeds in two output folders
    cifar = both["runs"]["cifar"]
    assert cifar["seeds"] == [0, 1] and cifar["best"]["n"] == 2
    assert cifar["best_acc1"] == pytest.approx((60.0 + 62.0) / 2)
    assert cifar["best_acc1_std"] == pytest.approx(_std([60.0, 62.0]))
    md = cr.collect([f"{s0},{s1}"], out=tmp_path / "r", names=["official"], plots=True)["markdown"]
    assert "61.00 ± 1.41 (n=2)" in md and "oxford_iiit_pet unfinished (21/100 epochs logged)" in md


def test_plot_has_error_bars_over_seeds(seeded_exp: Path, tmp_path: Path) -> None:
    s = cr.summarize(seeded_exp)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        captured.update(x=x, y=y, yerr=kwargs.get("yerr"), xerr=kwargs.get("xerr"))
        return real(self, x, y, *args, **kwargs)

    plt.Axes.errorbar = spy
    try:
        path = cr.plot_accuracy_vs_throughput([s], tmp_path / "t.png")
    finally:
        plt.Axes.errorbar = real
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert captured["y"] == [pytest.approx(s["best"]["Average"]["value"])]
    assert captured["yerr"] == [pytest.approx(s["best"]["Average"]["std"])]
    assert captured["xerr"] == [pytest.approx(_std([1000, 1010, 1020]))]


def test_ablation_layout_has_group_means_and_trainable_parameters(tmp_path: Path) -> None:
    rows = {"tome": 70.0, "token_sigmoid": 71.0}          # seed k of task t: base + t's offset + k
    offsets = {"cifar": 0.0, "dtd": 2.0, "eurosat": 10.0, "kitti": -5.0}
    exps = []
    for row, base in rows.items():
        exp = tmp_path / "logs" / "vit_b16" / "ablation" / row
        for task, off in offsets.items():
            for seed in (0, 1):
                write_seed_run(exp, task, seed, best=base + off + seed, last=base + off - 10)
        exps.append(str(exp))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_results.py"), *exps, "--ablation",
                           "--no-plots", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "ablation.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| Experiment"))
    assert header.split(" | ")[1:] == ["Natural", "Specialized", "Structured", "Average (groups)",
                                       "Trainable params (K) |"]
    cells = [line.strip("| ").split(" | ") for line in table if line.startswith("| ") and "ablation/" in line]
    assert [c[0] for c in cells] == ["vit_b16/ablation/tome", "vit_b16/ablation/token_sigmoid"]
    tome = cells[0]
    # Natural = mean(cifar, dtd) = base + 1 + seed: 71 and 72 over the two seeds -> 71.50 ± 0.71
    natural, special, struct = [71.0, 72.0], [80.0, 81.0], [65.0, 66.0]
    average = [(a + b + c) / 3 for a, b, c in zip(natural, special, struct)]
    assert tome[1] == f"71.50 ± {_std(natural):.2f} (n=2)*"            # * : 2 of the 7 Natural tasks
    assert tome[2] == f"80.50 ± {_std(special):.2f} (n=2)*" and tome[3] == f"65.50 ± {_std(struct):.2f} (n=2)*"
    assert tome[4] == f"{sum(average) / 2:.2f} ± {_std(average):.2f} (n=2)*" and tome[5] == "1.00"
    assert "## Ablation layout" in proc.stdout


# ------------------------------------------------------------------------------------ methods
def test_method_label_of_a_merging_section() -> None:
    assert cr.method_label(None) is None and cr.method_label("x") is None
    assert cr.method_label({}) == "none" and cr.method_label({"r": None, "pyra": False}) == "none"
    assert cr.method_label({"r": [0, 0], "method": "fpet"}) == "none"              # an all-zero schedule
    assert cr.method_label({"r": "high"}) == "tome"                                  # older runs: no method key
    assert cr.method_label({"r": [8, 8], "method": "tome", "pyra": True}) == "pyra"
    assert cr.method_label({"r": [98, 0], "method": "fpet", "pyra": False}) == "fpet"
    assert cr.method_label({"r": None, "method": "diffrate"}) == "diffrate"          # counts in its options
    assert cr.method_label({"r": [4], "method": "fpet", "pyra": {"weights": "token"}}) == "fpet+pyra"


def test_method_column_and_plot_markers_per_method(tmp_path: Path) -> None:
    merging = {"none": "{r: null, pyra: false}", "tome": "{r: [8, 8], pyra: false, method: tome}",
               "pyra": "{r: [8, 8], pyra: true, method: tome}", "fpet": "{r: [98, 0], pyra: false, method: fpet}",
               "diffrate": "{r: [20, 30], pyra: false, method: diffrate}"}
    exps = []
    for i, (name, section) in enumerate(merging.items()):
        exp = tmp_path / "logs" / name
        for seed in (0, 1):
            d = write_seed_run(exp, "dtd", seed, best=60.0 + i + seed, last=60.0, throughput=1000.0 + 100 * i)
            (d / "config.yaml").write_text(f"seed: {seed}\ntrain:\n  epochs: 10\nmerging: {section}\n")
        exps.append(exp)
    old = write_run(tmp_path / "logs" / "old", "dtd", [(0, 50.0), (9, 55.0)], throughput=1500.0)   # no merging key
    write_official(tmp_path / "outputs" / "x_compress_high_PYRA_LR_0.0001", "dtd", [50.0] * 11)
    exps += [old.parent, tmp_path / "outputs" / "x_compress_high_PYRA_LR_0.0001"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls, real = [], plt.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append(kwargs)
        return real(self, x, y, *args, **kwargs)

    plt.Axes.errorbar = spy
    try:
        result = cr.collect(exps, out=tmp_path / "r")
    finally:
        plt.Axes.errorbar = real
    expected = [*merging, "tome", "pyra"]   # the old run's tokens decrease; the official run has token_merging, pyra
    assert [s["method"] for s in result["summaries"]] == expected
    lines = result["markdown"].splitlines()
    assert lines[4].startswith("| Experiment | Method | Cifar100 |")
    assert [line.split(" | ")[1] for line in lines[6:6 + len(exps)]] == expected
    with open(tmp_path / "r" / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == expected
    with open(tmp_path / "r" / "results_runs.csv") as f:
        assert {r["method"] for r in csv.DictReader(f) if r["experiment"] == "fpet"} == {"fpet"}
    # The official run has no throughput: six points, five methods, each with its own colour, marker, legend entry.
    assert len(calls) == 6
    style = {c["label"]: (c["color"], c["marker"]) for c in calls if c["label"]}
    assert list(style) == ["none", "tome", "pyra", "fpet", "diffrate"]
    assert len(set(style.values())) == 5 and len({m for _, m in style.values()}) == 5
    assert (calls[5]["color"], calls[5]["marker"]) == style["tome"]      # the old run joins ToMe's colour
    assert all(c["markerfacecolor"] == "none" for c in calls)            # one task of 19: incomplete, hollow

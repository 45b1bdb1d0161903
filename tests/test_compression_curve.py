"""scripts/compression_curve.py: the grid, skip-finished, SLURM and collect paths, with a stand-in for train.py.

``PYTHON`` points at a small script: train.py calls (made by scripts/vtab.sh) are logged and write a
final.json with a known top-1 (``FAKE_ACC``: experiment -> base accuracy; seed k adds k); anything else
(vtab.sh's config lookup) runs in the real Python.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compression_curve.py"
spec = importlib.util.spec_from_file_location("scripts_compression_curve", SCRIPT)
curve_mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = curve_mod          # dataclasses look their module up
spec.loader.exec_module(curve_mod)

FAKE = """#!{python}
import json, os, sys
args = sys.argv[1:]
if "train.py" not in args:
    os.execv({python!r}, [{python!r}] + args)
value = lambda key: [a.split("=", 1)[1] for a in args if a.startswith(key + "=")][-1]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "task": value("data.task"), "seed": value("seed")}}) + "\\n")
experiment = value("experiment") if any(a.startswith("experiment=") for a in args) else "demo/digits"
out = os.path.join(value("output_dir"), experiment, value("data.task"), "seed" + value("seed"))
os.makedirs(out, exist_ok=True)
acc = json.loads(os.environ["FAKE_ACC"])[experiment] + int(value("seed"))
open(os.path.join(out, "final.json"), "w").write(json.dumps(
    {{"finished": True, "best_acc1": acc, "last_acc1": acc - 1, "epochs": 1}}))
"""
CONFIG = str(ROOT / "configs" / "demo" / "digits.yaml")
ACC = {"demo/digits/curve/none": 90.0, "demo/digits/curve/tome_r4": 85.0, "demo/digits/curve/tome_r8": 70.0,
       "demo/digits/curve/pyra_r4": 88.0, "demo/digits/curve/pyra_r8": 80.0, "demo/digits": 75.0}
RATES = {"uncompressed": [100.0, 100.0], "tome_r4": [150.0, 160.0], "tome_r8": [300.0, 310.0],
         "pyra_r4": [148.0, 150.0], "pyra_r8": [290.0, 300.0], "small: demo/digits": [280.0, 290.0]}


@pytest.fixture
def fake(tmp_path: Path, monkeypatch) -> Path:
    python = tmp_path / "fakepython"
    python.write_text(FAKE.format(python=sys.executable))
    python.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    for key in ("GPU", "CUDA_VISIBLE_DEVICES", "NPROC", "SEEDS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHON", str(python))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_ACC", json.dumps(ACC))
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def grid_args(tmp_path: Path, *extra: str) -> list[str]:
    return [CONFIG, f"output_dir={tmp_path / 'logs'}", "train.epochs=1", "--r", "4", "8", "--methods", "tome", "pyra",
            "--tasks", "dtd", "--seeds", "0", "1", "--small", CONFIG, *extra]


def injected(seen: list):
    def measure(specs):
        seen.extend(specs)
        return [RATES[s["name"]] for s in specs]
    return measure


def test_grid_trains_every_point_once_then_skips(fake: Path, tmp_path: Path, capsys) -> None:
    seen: list = []
    assert curve_mod.main(grid_args(tmp_path), measure=injected(seen)) == 0
    made = calls(fake)
    # uncompressed + 2 methods x 2 rates + the small model, one task, two seeds
    assert len(made) == 6 * 2
    assert sorted((c["task"], c["seed"]) for c in made) == sorted([("dtd", "0"), ("dtd", "1")] * 6)
    experiments = sorted({[a for a in c["args"] if a.startswith("experiment=")][-1] if any(
        a.startswith("experiment=") for a in c["args"]) else "(config's)" for c in made})
    assert experiments == ["(config's)"] + [f"experiment=demo/digits/curve/{n}" for n in
                                            ("none", "pyra_r4", "pyra_r8", "tome_r4", "tome_r8")]
    pyra8 = next(c["args"] for c in made if "experiment=demo/digits/curve/pyra_r8" in c["args"] and c["seed"] == "1")
    assert pyra8[:3] == ["train.py", "--config", CONFIG] and pyra8[3:5] == ["--resume", "auto"]
    for item in ("merging.method=tome", "merging.pyra=true", "merging.r=8", "train.epochs=1", "seed=1",
                 "data.task=dtd"):
        assert item in pyra8
    none = next(c["args"] for c in made if "experiment=demo/digits/curve/none" in c["args"])
    assert "merging.r=null" in none and "merging.pyra=false" in none

    # the models timed together, in grid order, each from the point's config and overrides
    assert [s["name"] for s in seen] == list(RATES)
    assert "merging.r=4" in seen[1]["overrides"] and f"output_dir={tmp_path / 'logs'}" in seen[1]["overrides"]
    out = tmp_path / "logs" / "demo" / "digits" / "curve"
    with open(out / "curve.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert float(rows["tome_r8"]["accuracy"]) == pytest.approx(70.5)            # seeds 0, 1: 70 and 71
    assert float(rows["tome_r8"]["accuracy_std"]) == pytest.approx(2 ** -0.5, abs=1e-4)
    assert float(rows["tome_r8"]["images_per_s"]) == pytest.approx(305.0)
    assert float(rows["tome_r8"]["speedup"]) == pytest.approx(3.05)
    assert rows["uncompressed"]["kind"] == "uncompressed" and rows["small: demo/digits"]["kind"] == "small"
    assert rows["tome_r8"]["speed_vs_small"] == "faster" and rows["tome_r8"]["adverse"] == "True"   # 70.5 < 75.5
    assert rows["pyra_r8"]["adverse"] == "False" and rows["pyra_r8"]["verdict"] == "no: above the small model"
    assert rows["tome_r4"]["verdict"] == "no: slower than the small model"
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "curve.json").read_text())
    assert data["accuracy"] == "VTAB-1k mean of group means" and data["seeds"] == [0, 1]
    assert "tome_r8: 70.50 ± 0.71 (n=2) at 305.0 img/s, 3.05x the uncompressed" in capsys.readouterr().out

    # again: everything is finished, nothing trains
    fake.unlink()
    assert curve_mod.main(grid_args(tmp_path), measure=injected([])) == 0
    assert calls(fake) == []
    assert "skip pyra_r8 dtd seed 1" in capsys.readouterr().err
    # one run lost (e.g. a crash before final.json): only that one is trained again
    (tmp_path / "logs" / "demo" / "digits" / "curve" / "tome_r4" / "dtd" / "seed1" / "final.json").unlink()
    assert curve_mod.main(grid_args(tmp_path), measure=injected([])) == 0
    (again,) = calls(fake)
    assert "experiment=demo/digits/curve/tome_r4" in again["args"] and again["seed"] == "1"


def test_slurm_writes_one_element_per_unfinished_run(fake: Path, tmp_path: Path) -> None:
    job = tmp_path / "curve.sbatch"
    done = tmp_path / "logs" / "demo" / "digits" / "curve" / "pyra_r4" / "dtd" / "seed0" / "final.json"
    done.parent.mkdir(parents=True)
    done.write_text('{"finished": true}')
    assert curve_mod.main(grid_args(tmp_path, "--slurm", str(job))) == 0
    assert calls(fake) == []                                            # nothing trained here
    text = job.read_text()
    assert "#SBATCH --array=0-10" in text                              # 12 runs, one finished
    (pyra4,) = [line for line in text.splitlines() if "experiment=demo/digits/curve/pyra_r4" in line]
    assert "SEEDS=1" in pyra4
    first = next(line for line in text.splitlines() if line.strip().startswith("0)"))
    assert "SEEDS=0" in first and "scripts/vtab.sh dtd" in first and "experiment=demo/digits/curve/none" in first
    proc = subprocess.run(["bash", str(job)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls(fake)
    assert call["seed"] == "0" and "experiment=demo/digits/curve/none" in call["args"]


def test_collect_only_times_the_real_models_and_redraws(fake: Path, tmp_path: Path) -> None:
    for experiment, acc in ACC.items():                 # the runs as the grid would have left them
        for seed in (0, 1):
            run = tmp_path / "logs" / experiment / "dtd" / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "final.json").write_text(json.dumps({"finished": True, "best_acc1": acc + seed,
                                                        "last_acc1": acc, "epochs": 1}))
    out = tmp_path / "redrawn"
    proc = subprocess.run([sys.executable, str(SCRIPT), *grid_args(tmp_path), "--collect-only", "--out", str(out),
                           "--device", "cpu", "--batch-size", "4", "--rounds", "2", "--min-seconds", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert calls(fake) == []
    data = json.loads((out / "curve.json").read_text())
    assert [len(r["rates"]) for r in data["rows"]] == [2] * 6 and data["device"] == "cpu"
    assert all(r["images_per_s"] > 0 for r in data["rows"])
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_only_without_runs_and_bad_usage(fake: Path, tmp_path: Path, capsys) -> None:
    assert curve_mod.main(grid_args(tmp_path, "--collect-only"), measure=injected([])) == 2
    assert "no point of the curve has a finished run" in capsys.readouterr().err
    cases = [(["--methods", "nosuch"], "merging.method"), (["--r", "4", "4"], "appears twice"),
             (["merging.r=8"], "set by the curve"), (["--slurm", "x", "--collect-only"], "exclude each other")]
    for extra, message in cases:
        args = grid_args(tmp_path)
        if extra[0] in ("--methods", "--r"):
            i = args.index(extra[0])
            j = next(k for k in range(i + 1, len(args)) if args[k].startswith("--"))
            args[i:j] = extra
        elif "=" in extra[0]:
            args[1:1] = extra                       # an override, next to the config
        else:
            args += extra
        assert curve_mod.main(args) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert calls(fake) == []


def test_included_experiments_join_the_curve_untrained(fake: Path, tmp_path: Path) -> None:
    """Runs trained before (e.g. by vtab_all.sh) become points: method and r from their saved config."""
    from lib.config import load_config, save_config

    included = {}
    for name, overrides, acc in (("plain", ["merging.r=null", "merging.pyra=false"], 90.0),
                                 ("pyra_high", ["merging.r=[24,16,8,4]", "merging.pyra=true"], 84.0)):
        exp = tmp_path / "old" / name
        for seed in (0, 1):
            run = exp / "dtd" / f"seed{seed}"
            run.mkdir(parents=True)
            save_config(load_config(CONFIG, overrides), run / "config.yaml")
            (run / "final.json").write_text(json.dumps({"finished": True, "best_acc1": acc + seed,
                                                        "last_acc1": acc, "epochs": 6}))
        included[name] = str(exp)
    seen: list = []
    args = [CONFIG, f"output_dir={tmp_path / 'logs'}", "--r", "8", "--methods", "pyra", "--tasks", "dtd",
            "--seeds", "0", "1", "--include", included["plain"], included["pyra_high"]]
    assert curve_mod.main(args, measure=lambda specs: seen.extend(specs) or [[100.0, 100.0]] * len(specs)) == 0
    # only the grid's own point trained: the included uncompressed model replaces the grid's
    assert {c["args"][-3] for c in calls(fake)} == {"experiment=demo/digits/curve/pyra_r8"}
    assert len(calls(fake)) == 2
    assert [s["name"] for s in seen] == ["pyra_r8", "uncompressed", "pyra_r24-16-8-4"]
    assert seen[1]["config"] == str(Path(included["plain"]) / "dtd" / "seed0" / "config.yaml")
    data = json.loads((tmp_path / "logs" / "demo" / "digits" / "curve" / "curve.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["pyra_r24-16-8-4"]["method"] == "pyra" and rows["pyra_r24-16-8-4"]["r"] == "[24, 16, 8, 4]"
    assert rows["pyra_r24-16-8-4"]["accuracy"]["value"] == pytest.approx(84.5)
    assert rows["uncompressed"]["kind"] == "uncompressed" and rows["uncompressed"]["experiment"] == included["plain"]

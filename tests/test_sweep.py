"""scripts/sweep.py: grid parsing, selection on validation, selected.json, continuation, the SLURM array, and a
sweep on the demo digits end to end (real train.py, 2 points x 2 seeds, 2 epochs)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.py"
DEMO = ROOT / "configs" / "demo" / ("digits_random.yaml" if (ROOT / "configs/demo/digits_random.yaml").is_file()
                                   else "digits.yaml")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sw = _load_script("sweep")


def test_importing_the_script_leaves_the_models_package_whole() -> None:
    import models

    assert hasattr(models, "create_model") and hasattr(models, "load_checkpoint")


def test_split_values_keeps_brackets_and_quotes() -> None:
    assert sw.split_values("1e-4,3e-4") == ["1e-4", "3e-4"]
    assert sw.split_values("[4,2],[8, 4]") == ["[4,2]", "[8, 4]"]
    assert sw.split_values("'a,b',c") == ["'a,b'", "c"]
    assert sw.split_values("high") == ["high"]


def test_parse_items_grid_overrides_and_refusals() -> None:
    grid, overrides = sw.parse_items(["optim.pyra_lr=1e-4,3e-4", "train.epochs=2", "merging.r=[4,2]",
                                      "optim.lr=1e-3,1e-2,1e-1"])
    assert grid == {"optim.pyra_lr": ["1e-4", "3e-4"], "optim.lr": ["1e-3", "1e-2", "1e-1"]}
    assert overrides == ["train.epochs=2", "merging.r=[4,2]"]
    for bad in (["seed=1,2"], ["data.task=dtd"], ["data.train_split=train800"], ["a=1,,2"], ["a=1,1"],
                ["x"], ["a=1,2", "a=3"], ["a=1,2", "a=3,4"]):
        with pytest.raises(sw.SweepError):
            sw.parse_items(bad)


def test_grid_points_are_the_product_in_grid_order() -> None:
    points = sw.grid_points({"a": ["1", "2"], "b": ["x", "y", "z"]})
    assert points == [{"a": "1", "b": "x"}, {"a": "1", "b": "y"}, {"a": "1", "b": "z"},
                      {"a": "2", "b": "x"}, {"a": "2", "b": "y"}, {"a": "2", "b": "z"}]
    assert sw.point_name({"optim.pyra_lr": "1e-4", "merging.r": "[4, 2]"}) == "optim.pyra_lr=1e-4+merging.r=_4__2_"


def test_default_grid_is_the_official_pyra_lr_sweep(tmp_path: Path) -> None:
    sweep = sw.Sweep(str(DEMO), ["digits"], {}, [f"output_dir={tmp_path}"])
    assert sweep.grid == {"optim.pyra_lr": ["1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3"]}
    assert len(sweep.points) == 6 and sweep.seeds == [0]
    with pytest.raises(sw.SweepError, match="optim.pyra_lrr"):
        sw.Sweep(str(DEMO), ["digits"], {"optim.pyra_lrr": ["1", "2"]}, [])


def _fake_final(run: Path, last: float, best: float | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "final.json").write_text(json.dumps({"best_acc1": best if best is not None else last, "last_acc1": last,
                                                "epochs": 2, "finished": True}))


def test_selection_takes_the_first_of_tied_best_and_records_everything(tmp_path: Path) -> None:
    grid = {"optim.pyra_lr": ["1e-5", "1e-4", "1e-3"]}
    sweep = sw.Sweep(str(DEMO), ["digits"], grid, [f"output_dir={tmp_path}"], seeds=[3],
                     python="/nonexistent/python")             # any training attempt would fail
    # Validation: last-epoch 50, 70, 70 (best over epochs would pick the first point: 90).
    for i, (last, best) in enumerate([(50.0, 90.0), (70.0, 71.0), (70.0, 75.0)]):
        _fake_final(sweep.run_dir("val", i, "digits", 3), last, best)
    _fake_final(sweep.run_dir("test", 1, "digits", 3), 66.0, 68.0)   # the winner's test run, done already
    assert sweep.run("digits", 3) is True
    path = tmp_path / "demo" / "digits_random" / "digits" / "seed3" / "selected.json"
    if DEMO.name == "digits.yaml":
        path = tmp_path / "demo" / "digits" / "digits" / "seed3" / "selected.json"
    data = json.loads(path.read_text())
    assert data["grid"] == grid and data["chosen"] == {"optim.pyra_lr": "1e-4"} and data["chosen_index"] == 1
    assert [p["val_acc1"] for p in data["points"]] == [50.0, 70.0, 70.0]
    assert [p["val_best_acc1"] for p in data["points"]] == [90.0, 71.0, 75.0]
    assert data["test"]["acc1"] == 66.0 and data["test"]["best_acc1"] == 68.0 and data["finished"] is True
    assert data["seed"] == 3 and data["task"] == "digits" and "ties: the first" in data["selection"]
    assert sweep.is_selected("digits", 3)


def test_a_finished_point_of_another_config_is_refused(tmp_path: Path) -> None:
    sweep = sw.Sweep(str(DEMO), ["digits"], {"optim.pyra_lr": ["1e-5", "1e-4"]},
                     [f"output_dir={tmp_path}", "train.epochs=2"])
    run = sweep.run_dir("val", 0, "digits", 0)
    _fake_final(run, 50.0)
    (run / "config.yaml").write_text("sched:\n  warmup_epochs: 0\ntrain:\n  epochs: 3\n")
    with pytest.raises(sw.SweepError, match="train.epochs: 3 there, 2 asked"):
        sweep.finished("val", 0, "digits", 0)


def test_cli_usage_errors() -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=60)

    assert run(str(DEMO), "digits", "seed=1,2").returncode == 2
    assert run("no/such.yaml", "digits").returncode == 2
    assert run(str(DEMO), "digits", "optim.pyra_lr=1e-5,1e-4", "--point", "2").returncode == 2
    assert run(str(DEMO), "digits", "--seeds", "0 x").returncode == 2
    assert run(str(DEMO), "digits", "--submit").returncode == 2


# ------------------------------------------------------------------------------------------ end to end
TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "merging.r=[4,2]", "peft.dim=4", "train.epochs=2", "train.batch_size=100", "train.eval_batch_size=400",
        "train.eval_interval=1", "sched.warmup_epochs=0", "report.benchmark_batch=4",
        "report.benchmark_seconds=0.01", "report.flops=false", "data.num_workers=0"]
GRID = "optim.lr=1e-3,3e-2"


def _last_test_acc(run: Path) -> float:
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()][-1]["test_acc1"]


def test_sweep_on_demo_digits_end_to_end_with_slurm_elements(tmp_path: Path) -> None:
    from data.make_digits import write_digits

    write_digits(tmp_path / "data", "digits")
    out = tmp_path / "logs"
    items = [GRID, *TINY, f"data.root={tmp_path / 'data'}", f"output_dir={out}", "experiment=dsweep"]
    env = {k: v for k, v in os.environ.items() if k not in ("SEEDS", "GPU", "NPROC", "PYTHON", "SLURM_ARRAY_TASK_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def sweep(*extra: str, **more: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(SWEEP), str(DEMO), "digits", *items, *extra], cwd="/",
                              env={**env, **more}, capture_output=True, text=True, timeout=600)
        return proc

    # 1. The SLURM array: 2 seeds x 2 points = 4 elements, each the same single-run command.
    script = tmp_path / "array.sbatch"
    proc = sweep(f"--slurm={script}", SEEDS="0 1")
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and text.count(" --point ") == 4 and "--seeds 0 --point 1" in text

    # 2. Two elements run here (no SLURM): seed 0's points. The first leaves the selection to the last.
    exp = out / "dsweep"
    for element in ("0", "1"):
        run = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": element},
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        if element == "0":
            assert "the last point to finish selects" in run.stderr
            assert not (exp / "digits" / "seed0" / "selected.json").exists()
    assert json.loads((exp / "digits" / "seed0" / "selected.json").read_text())["finished"] is True

    # 3. The local sweep continues: seed 0 is done, seed 1 trains. Regenerating the array: nothing left.
    proc = sweep(SEEDS="0 1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "digits seed 0: selected earlier" in proc.stderr
    assert proc.stderr.count("train.py --config") == 3                 # seed 1: 2 points + 1 test run
    again = sweep("--seeds", "0 1")
    assert again.returncode == 0 and "train.py --config" not in again.stderr
    assert "nothing to submit" in sweep(f"--slurm={script}", SEEDS="0 1").stderr

    # 4. selected.json against the runs' own logs and configs.
    from lib.config import load_config

    lrs = ["1e-3", "3e-2"]
    tests = []
    for seed in (0, 1):
        data = json.loads((exp / "digits" / f"seed{seed}" / "selected.json").read_text())
        val_runs = [exp / "sweep" / "val" / f"optim.lr={lr}" / "digits" / f"seed{seed}" for lr in lrs]
        val = [_last_test_acc(r) for r in val_runs]                       # eval split = val200 here
        assert [p["val_acc1"] for p in data["points"]] == val
        winner = 0 if val[0] >= val[1] else 1
        assert data["chosen"] == {"optim.lr": lrs[winner]} and data["grid"] == {"optim.lr": lrs}
        test_run = exp / "sweep" / "test" / f"optim.lr={lrs[winner]}" / "digits" / f"seed{seed}"
        assert data["test"]["acc1"] == _last_test_acc(test_run)
        tests.append(data["test"]["acc1"])
        for run, splits in [(r, ("train800", "val200")) for r in val_runs] + [(test_run, ("train800val200", "test"))]:
            cfg = load_config(run / "config.yaml")
            assert (cfg.data.train_split, cfg.data.eval_split, cfg.seed, cfg.train.epochs) == (*splits, seed, 2)
        assert load_config(test_run / "config.yaml").optim.lr == float(lrs[winner])
        # The runs' own logs name the splits they read.
        assert "val200" in (val_runs[0] / "train.log").read_text()
        assert "train800val200" in (test_run / "train.log").read_text()

    # 5. collect_results reads the validation-selected accuracy (mean ± std over the two seeds).
    cr = _load_script("collect_results")
    s = cr.summarize(exp)
    entry = s["runs"]["digits"]
    assert entry["selected"]["n"] == 2 and entry["selected_acc1"] == pytest.approx(sum(tests) / 2)
    assert entry["selected"]["std"] == pytest.approx(abs(tests[0] - tests[1]) / 2 ** 0.5)
    assert "sweep" not in s["runs"]

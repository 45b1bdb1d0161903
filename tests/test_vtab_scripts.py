"""scripts/vtab.sh and scripts/vtab_all.sh with a stand-in interpreter that records the train.py calls.

``PYTHON`` points at a small script: calls to train.py (with or without --nproc-per-node) are
logged and succeed or fail on demand; anything else (vtab_all's config lookup) runs in the real Python.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VTAB = ROOT / "scripts" / "vtab.sh"
VTAB_ALL = ROOT / "scripts" / "vtab_all.sh"
OFFICIAL_ORDER = ("cifar caltech101 dtd oxford_flowers102 oxford_iiit_pet svhn sun397 patch_camelyon eurosat "
                  "resisc45 diabetic_retinopathy clevr_count clevr_dist dmlab kitti dsprites_loc dsprites_ori "
                  "smallnorb_azi smallnorb_ele").split()

FAKE = """#!{python}
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["-c"] and "device_count" in args[1] and "FAKE_GPUS" in os.environ:  # vtab.sh counting GPUs
    print(os.environ["FAKE_GPUS"])
    sys.exit(0)
if "train.py" not in args:
    os.execv({python!r}, [{python!r}] + args)
task = [a for a in args if a.startswith("data.task=")][-1].split("=", 1)[1]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "cwd": os.getcwd(), "task": task,
                        "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")
if task in os.environ.get("FAKE_FAIL", "").split():
    sys.exit(1)
if os.environ.get("FAKE_SLEEP"):  # a long run that, like train.py, checkpoints and exits 0 on SIGTERM
    import signal, time
    def stop(signum, frame):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({{"signal": signum, "task": task}}) + "\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(float(os.environ["FAKE_SLEEP"]))
if task not in os.environ.get("FAKE_UNFINISHED", "").split():  # as train.py: final.json when done
    value = lambda key, default: ([a.split("=", 1)[1] for a in args if a.startswith(key + "=")] or [default])[-1]
    config = args[args.index("--config") + 1]
    out = os.path.join(value("output_dir", "logs"), value("experiment", os.path.basename(config)[:-5]), task,
                       "seed" + value("seed", "0"))
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "final.json"), "w").write('{{"finished": true}}')
"""


@pytest.fixture
def fake(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(environment for the scripts, call log)."""
    python = tmp_path / "fakepython"
    python.write_text(FAKE.format(python=sys.executable))
    python.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("GPU", "CUDA_VISIBLE_DEVICES", "NPROC", "TASKS")}
    env.update(PYTHON=str(python), FAKE_LOG=str(log))
    return env, log


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfgs" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(f"_base_: {ROOT / 'configs' / 'demo' / 'digits.yaml'}\n")
    return path


def run(script: Path, args: list[str], env: dict[str, str], timeout: int = 60,
        **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)] + args, env={**env, **extra}, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_vtab_sh_runs_train_py_from_the_repo_with_resume_auto(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    proc = run(VTAB, ["dtd", str(config), "train.epochs=2", f"output_dir={tmp_path / 'x'}"], env)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls(log)
    assert call["cwd"] == str(ROOT)
    assert call["args"] == ["train.py", "--config", str(config), "--resume", "auto", "train.epochs=2",
                            f"output_dir={tmp_path / 'x'}", "data.task=dtd"]
    assert call["cvd"] is None


def test_vtab_sh_flags_gpu_and_config_shorthand(fake, tmp_path: Path) -> None:
    env, log = fake
    out = f"output_dir={tmp_path}"   # the stand-in writes final.json there, as train.py would
    assert run(VTAB, ["kitti", "demo/digits", "--overwrite", "seed=1", out], env, GPU="3").returncode == 0
    assert run(VTAB, ["kitti", "configs/demo/digits.yaml", "--resume", "/ck/last.pth", out], env, GPU="3",
               CUDA_VISIBLE_DEVICES="1").returncode == 0
    first, second = calls(log)
    digits = str(ROOT / "configs" / "demo" / "digits.yaml")
    assert first["args"] == ["train.py", "--config", digits, "--overwrite", "seed=1", out, "data.task=kitti"]
    assert first["cvd"] == "3"
    assert second["args"] == ["train.py", "--config", digits, "--resume", "/ck/last.pth", out, "data.task=kitti"]
    assert second["cvd"] == "1"  # an explicit CUDA_VISIBLE_DEVICES wins over GPU


def test_vtab_sh_multi_gpu_uses_torchrun(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    assert run(VTAB, ["svhn", str(config), f"output_dir={tmp_path}"], env, NPROC="2", FAKE_GPUS="2").returncode == 0
    (call,) = calls(log)
    assert call["args"][:3] == ["train.py", "--nproc-per-node", "2"]


def test_vtab_sh_refuses_more_processes_than_visible_gpus(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    proc = run(VTAB, ["svhn", str(config), f"output_dir={tmp_path}"], env, NPROC="4", FAKE_GPUS="2",
               CUDA_VISIBLE_DEVICES="0,1")
    assert proc.returncode == 2 and "NPROC=4 processes but 2 visible GPU(s) (CUDA_VISIBLE_DEVICES=0,1)" in proc.stderr
    assert calls(log) == []
    # CPU processes (gloo) need no GPU
    cpu = run(VTAB, ["svhn", str(config), f"output_dir={tmp_path}", "train.device=cpu"], env, NPROC="2",
              FAKE_GPUS="0")
    assert cpu.returncode == 0, cpu.stderr
    assert calls(log)[0]["args"][:3] == ["train.py", "--nproc-per-node", "2"]


def test_vtab_sh_rejects_bad_usage(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    assert run(VTAB, ["dtd"], env).returncode == 2
    assert run(VTAB, ["dtd", "no/such/config.yaml"], env).returncode == 2
    assert run(VTAB, ["dtd", str(config), "data.task=kitti"], env).returncode == 2
    assert run(VTAB, ["dtd", str(config)], env, NPROC="x").returncode == 2
    assert calls(log) == []
    failing = run(VTAB, ["dtd", str(config), f"output_dir={tmp_path}"], env, FAKE_FAIL="dtd")
    assert failing.returncode == 1


def test_vtab_all_runs_19_tasks_in_official_order(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    proc = run(VTAB_ALL, ["--gpu", "5", str(config), f"output_dir={tmp_path / 'out'}"], env)
    assert proc.returncode == 0, proc.stderr
    made = calls(log)
    assert [c["task"] for c in made] == OFFICIAL_ORDER
    assert {c["cvd"] for c in made} == {"5"}
    assert all(c["args"][:5] == ["train.py", "--config", str(config), "--resume", "auto"] for c in made)


def test_vtab_all_skips_finished_continues_past_failures(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    out = tmp_path / "out"
    # Finished runs: kitti under its own name, oxford_iiit_pet under the paper's spelling.
    for task in ("kitti", "oxford_pet"):
        (out / "tiny" / task / "seed0").mkdir(parents=True)
        (out / "tiny" / task / "seed0" / "final.json").write_text('{"finished": true}')
    (out / "tiny" / "dtd" / "seed0").mkdir(parents=True)   # unfinished: no final.json -> resumed
    proc = run(VTAB_ALL, [str(config), f"output_dir={out}"], env,
               TASKS="cifar100 kitti oxford_iiit_pet dtd svhn eurosat", FAKE_FAIL="cifar svhn",
               FAKE_UNFINISHED="eurosat")
    assert proc.returncode == 1
    assert [c["task"] for c in calls(log)] == ["cifar", "dtd", "svhn", "eurosat"]
    assert (out / "tiny" / "dtd" / "seed0" / "final.json").is_file()
    assert "failed tasks: cifar svhn eurosat" in proc.stderr
    assert "eurosat stopped before the end" in proc.stderr
    assert "skip kitti" in proc.stderr and "skip oxford_iiit_pet" in proc.stderr

    # --overwrite re-runs finished tasks; experiment= moves the folder that is checked.
    log.unlink()
    proc = run(VTAB_ALL, [str(config), f"output_dir={out}", "--overwrite"], env, TASKS="kitti")
    assert proc.returncode == 0 and [c["task"] for c in calls(log)] == ["kitti"]
    assert "--overwrite" in calls(log)[0]["args"] and "--resume" not in calls(log)[0]["args"]
    log.unlink()
    (out / "renamed" / "dtd" / "seed0").mkdir(parents=True)
    (out / "renamed" / "dtd" / "seed0" / "final.json").write_text("{}")
    proc = run(VTAB_ALL, [str(config), f"output_dir={out}", "experiment=renamed"], env, TASKS="dtd kitti")
    assert proc.returncode == 0, proc.stderr
    assert [c["task"] for c in calls(log)] == ["kitti"]


def test_vtab_all_bad_config_fails_once(fake, config: Path) -> None:
    env, log = fake
    proc = run(VTAB_ALL, [str(config), "train.epochz=3"], env)
    assert proc.returncode == 2 and "train.epochz" in proc.stderr
    assert run(VTAB_ALL, [str(config), "data.task=dtd"], env).returncode == 2
    assert run(VTAB_ALL, [], env).returncode == 2
    assert calls(log) == []


# ----------------------------------------------------------------------------------------------- seeds
def _seed_of(call: dict) -> str | None:
    return ([a.split("=", 1)[1] for a in call["args"] if a.startswith("seed=")] or [None])[-1]


def test_vtab_sh_seeds_one_folder_each_finished_ones_skipped(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    out = tmp_path / "out"
    (out / "tiny" / "dtd" / "seed1").mkdir(parents=True)
    (out / "tiny" / "dtd" / "seed1" / "final.json").write_text('{"finished": true}')
    proc = run(VTAB, ["dtd", str(config), f"output_dir={out}"], env, SEEDS="0 1 2")
    assert proc.returncode == 0, proc.stderr
    made = calls(log)
    assert [_seed_of(c) for c in made] == ["0", "2"] and "skip dtd seed 1" in proc.stderr
    assert made[0]["args"] == ["train.py", "--config", str(config), "--resume", "auto", f"output_dir={out}",
                               "seed=0", "data.task=dtd"]
    assert all((out / "tiny" / "dtd" / f"seed{k}" / "final.json").is_file() for k in (0, 1, 2))
    # Everything finished: nothing runs, success.
    log.unlink()
    again = run(VTAB, ["dtd", str(config), f"output_dir={out}"], env, SEEDS="0 1 2")
    assert again.returncode == 0 and calls(log) == []
    # Without SEEDS: the config's seed (0), no seed= added; finished -> skipped.
    assert run(VTAB, ["dtd", str(config), f"output_dir={out}"], env).returncode == 0 and calls(log) == []
    # A failing seed does not stop the others; the exit code says so.
    proc = run(VTAB, ["kitti", str(config), f"output_dir={out}"], env, SEEDS="3 4", FAKE_FAIL="kitti")
    assert proc.returncode == 1 and [_seed_of(c) for c in calls(log)] == ["3", "4"]
    assert "seeds not finished: 3 4" in proc.stderr


def test_vtab_sh_several_seeds_pass_sigterm_on_and_stop(fake, config: Path, tmp_path: Path) -> None:
    import signal
    import time

    env, log = fake
    proc = subprocess.Popen(["bash", str(VTAB), "dtd", str(config), f"output_dir={tmp_path}"],
                            env={**env, "SEEDS": "0 1", "FAKE_SLEEP": "60"}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not calls(log):
        time.sleep(0.05)
    time.sleep(0.5)                                   # the stand-in installs its handler after logging
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    made = calls(log)
    assert [_seed_of(c) for c in made if "args" in c] == ["0"]          # seed 1 never started
    assert {"signal": signal.SIGTERM, "task": "dtd"} in made           # train.py got SIGTERM
    assert "stopped by SIGTERM" in err


def test_vtab_sh_seed_usage_errors(fake, config: Path) -> None:
    env, log = fake
    assert run(VTAB, ["dtd", str(config), "seed=1"], env, SEEDS="0 1").returncode == 2
    assert run(VTAB, ["dtd", str(config)], env, SEEDS="0 x").returncode == 2
    assert run(VTAB, ["dtd", str(config)], env, SEEDS="1 2 1").returncode == 2
    assert run(VTAB, ["dtd", str(config)], env, SEEDS="01").returncode == 2
    assert run(VTAB_ALL, [str(config)], env, SEEDS="-1").returncode == 2
    assert run(VTAB, ["dtd", str(config), "--resume", "/ck/last.pth"], env, SEEDS="0 1").returncode == 2
    assert calls(log) == []


def test_vtab_all_seeds_per_task_and_seed(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    out = tmp_path / "out"
    (out / "tiny" / "kitti" / "seed1").mkdir(parents=True)
    (out / "tiny" / "kitti" / "seed1" / "final.json").write_text('{"finished": true}')
    proc = run(VTAB_ALL, [str(config), f"output_dir={out}"], env, TASKS="dtd kitti", SEEDS="0 1",
               FAKE_FAIL="dtd")
    assert proc.returncode == 1
    assert [(c["task"], _seed_of(c)) for c in calls(log)] == [("dtd", "0"), ("dtd", "1"), ("kitti", "0")]
    assert "skip kitti/seed1" in proc.stderr and "failed tasks: dtd/seed0 dtd/seed1" in proc.stderr


# ----------------------------------------------------------------------------------------------- SLURM
def test_vtab_all_slurm_array_elements_run_locally(fake, config: Path, tmp_path: Path) -> None:
    env, log = fake
    out = tmp_path / "out"
    (out / "tiny" / "kitti" / "seed0").mkdir(parents=True)
    (out / "tiny" / "kitti" / "seed0" / "final.json").write_text('{"finished": true}')
    args = ["--slurm", "--sbatch=--time=1:00:00", str(config), f"output_dir={out}", "train.epochs=3"]
    proc = run(VTAB_ALL, args, env, TASKS="dtd kitti", SEEDS="0 1")
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == []                                        # --slurm trains nothing here
    script = out / "tiny" / "slurm" / "vtab_all.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --time=1:00:00" in text and "#SBATCH --gres=gpu:1" in text
    assert "skip kitti/seed0" in proc.stderr                       # finished: no element

    for element in ("0", "2"):                                     # two elements, no SLURM here
        done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": element},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    made = calls(log)
    assert [(c["task"], _seed_of(c)) for c in made] == [("dtd", "0"), ("kitti", "1")]
    assert made[0]["args"] == ["train.py", "--config", str(config), "--resume", "auto", f"output_dir={out}",
                               "train.epochs=3", "seed=0", "data.task=dtd"]
    assert made[0]["cwd"] == str(ROOT)
    # Re-running a finished element is harmless (skipped); a missing index is an error.
    again = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "skip dtd seed 0" in again.stderr and len(calls(log)) == 2
    assert subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "7"},
                          capture_output=True, text=True).returncode == 2
    # Regenerated, the array holds only what is left; --submit without sbatch fails after writing it.
    proc = run(VTAB_ALL, args + ["--submit"], env, TASKS="dtd kitti", SEEDS="0 1",
               PATH="/usr/bin:/bin")
    assert proc.returncode == 1 and "sbatch not found" in proc.stderr
    assert "#SBATCH --array=0-0" in script.read_text() and "dtd 0" not in script.read_text()
    assert run(VTAB_ALL, [str(config), "--submit"], env).returncode == 2
    assert run(VTAB_ALL, [str(config), "--slurm", "--overwrite"], env).returncode == 2


# ------------------------------------------------------------------------------------------ end to end
E2E_CONFIG = """\
model: {{name: vit, pretrained: "", img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}}
peft: {{type: lora, dim: 4}}
merging: {{r: [4, 2], pyra: true}}
data: {{root: {root}, num_workers: 0}}
optim: {{lr: 0.05}}
sched: {{warmup_epochs: 0}}
train: {{epochs: 2, batch_size: 8, eval_batch_size: 16, eval_interval: 1, device: cpu}}
report: {{benchmark_batch: 4, benchmark_seconds: 0.05, flops: true}}
"""


def make_vtab_tree(root: Path, tasks: dict[str, bool]) -> None:
    """Tiny VTAB-1k task folders: 16 train / 8 test 16×16 PNGs, 4 colour-coded classes.

    A task mapped to False gets shuffled test labels, so the two tasks end at different accuracies.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for task, learnable in tasks.items():
        for split, n in (("train800val200", 16), ("test", 8)):
            lines = []
            for i in range(n):
                label = i % 4
                pixels = np.full((16, 16, 3), label * 60, np.uint8) + rng.integers(0, 30, (16, 16, 3), dtype=np.uint8)
                rel = f"images/{split}/{i:06d}.png"
                (root / task / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / task / rel)
                shown = label if learnable or split != "test" else (label + 1 + i // 4) % 4
                lines.append(f"{rel} {shown}")
            (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_end_to_end_vtab_all_then_collect_results(tmp_path: Path) -> None:
    """Real train.py on two fake tasks (Natural: dtd, Structured: kitti) via vtab_all.sh -> vtab.sh, then
    collect_results' group means against a hand computation from the written files."""
    if not (ROOT / "train.py").is_file():
        pytest.skip("train.py is not there yet")
    make_vtab_tree(tmp_path / "vtab", {"dtd": True, "kitti": False})
    config = tmp_path / "tiny.yaml"
    config.write_text(E2E_CONFIG.format(root=tmp_path / "vtab"))
    out = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k not in ("GPU", "CUDA_VISIBLE_DEVICES", "NPROC", "PYTHON")}
    env.update(OMP_NUM_THREADS="1", TASKS="dtd kitti")
    proc = run(VTAB_ALL, [str(config), f"output_dir={out}"], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = out / "tiny"

    best, last = {}, {}
    for task in ("dtd", "kitti"):
        records = [json.loads(line) for line in (exp / task / "seed0" / "log.txt").read_text().splitlines()]
        final = json.loads((exp / task / "seed0" / "final.json").read_text())
        assert [r["epoch"] for r in records] == [0, 1] and final["finished"] is True
        best[task], last[task] = max(r["test_acc1"] for r in records), records[-1]["test_acc1"]
        assert final["best_acc1"] == best[task] and final["last_acc1"] == last[task]

    cr = _load_script("collect_results")
    result = cr.collect([exp], out=tmp_path / "report", names=["tiny"])
    s = result["summaries"][0]
    assert s["unfinished"] == [] and len(s["missing"]) == 17
    for metric, values in (("best", best), ("last", last)):
        means = s[metric]
        assert means["Natural"]["value"] == pytest.approx(values["dtd"])
        assert means["Structured"]["value"] == pytest.approx(values["kitti"])
        assert means["Specialized"]["value"] is None
        assert means["Average"]["value"] == pytest.approx((values["dtd"] + values["kitti"]) / 2)
        assert means["All"]["value"] == pytest.approx((values["dtd"] + values["kitti"]) / 2)
    efficiency = json.loads((exp / "dtd" / "seed0" / "efficiency.json").read_text())
    assert s["runs"]["dtd"]["gflops"] == pytest.approx(efficiency["gflops"]) and s["throughput"] > 0
    assert (tmp_path / "report" / "acc_curves.png").read_bytes()[:4] == b"\x89PNG"

    # The visualiser reads a run's best.pth (this project's format; its 47-class dtd head differs from the
    # config's default task).
    vm = _load_script("visualize_merging")
    image = exp.parent.parent / "vtab" / "dtd" / "images" / "test" / "000000.png"
    checkpoint = exp / "dtd" / "seed0" / "best.pth"
    assert vm.main(["--image", str(image), "--config", str(config), "--checkpoint", str(checkpoint),
                    "--layers", "0", "1", "--out", str(tmp_path / "merge.png")]) == 0
    assert (tmp_path / "merge.png").read_bytes()[:4] == b"\x89PNG"

    # A second pass finds both tasks finished and trains nothing.
    again = run(VTAB_ALL, [str(config), f"output_dir={out}"], env)
    assert again.returncode == 0 and "skipped 2 (finished)" in again.stderr


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vtab_all_runs_an_ablation_row_by_name(fake, tmp_path: Path) -> None:
    env, log = fake
    name = "vit_b16/ablation/token_sigmoid"     # the stand-in names its folder by experiment=, as train.py would
    proc = run(VTAB_ALL, [name, f"output_dir={tmp_path}", f"experiment={name}"], env)
    assert proc.returncode == 0, proc.stderr
    assert f"experiment folder: {tmp_path / name};" in proc.stderr
    made = calls(log)
    config = str(ROOT / "configs" / "vit_b16" / "ablation" / "token_sigmoid.yaml")
    assert [c["task"] for c in made] == OFFICIAL_ORDER
    assert all(c["args"][:3] == ["train.py", "--config", config] for c in made)

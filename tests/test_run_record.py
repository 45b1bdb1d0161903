"""A run's record is never wrong: resume with another recipe, evaluation of a checkpoint that does not fit,
bad files, two runs in one folder, class counts, Ctrl-C, unwritable places, file modes and the small
things — each through the command line (``train.main`` / ``eval.main`` with argv, or a subprocess)."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import eval as eval_script
import train as train_script
from data.make_digits import write_digits
from lib.config import load_config
from lib.optim import build_optimizer, build_scheduler
from models import create_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo/digits_random.yaml")
TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "merging.r=[4, 2]", "merging.pyra=true", "peft.dim=4", "data.num_workers=0", "train.batch_size=100",
        "train.eval_batch_size=400", "train.eval_interval=1", "report.benchmark_batch=4",
        "report.benchmark_seconds=0.01", "report.flops=false", "sched.warmup_epochs=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def root(digits_root):
    return digits_root   # the shared read-only digits (conftest)


def args(root, out, *extra):
    return ["--config", CONFIG, f"data.root={root}", "data.task=digits", f"output_dir={out}", "experiment=e",
            *TINY, *extra]


def run_folder(out):
    return Path(out) / "e" / "digits" / "seed0"


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(Path(folder).iterdir())}


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def killed_run(root, tmp_path_factory):
    """A 2-epoch run whose process died after its last checkpoint (final.json never written)."""
    out = tmp_path_factory.mktemp("killed")
    assert train_script.main(args(root, out, "train.epochs=2")) == 0
    (run_folder(out) / "final.json").unlink()
    return out


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# 1. resume never mixes recipes ----------------------------------------------------------------------------
def test_resume_with_another_recipe_is_refused_and_changes_no_file(root, killed_run, tmp_path, capsys):
    out = copy_run(killed_run, tmp_path / "out")
    before = snapshot(run_folder(out))
    rc = train_script.main(args(root, out, "train.epochs=3", "optim.lr=0.05", "train.batch_size=16",
                                "data.num_workers=0", "train.eval_batch_size=64", "--resume", "auto"))
    err = error_line(capsys)
    assert rc == 2
    for key, old, new in (("train.epochs", "2", "3"), ("optim.lr", "0.01", "0.05"), ("train.batch_size", "100", "16")):
        assert f"{key}: run {old}" in err.replace("'", "") and new in err, err
    assert "eval_batch_size" not in err                                 # cannot change results: may differ
    assert snapshot(run_folder(out)) == before


def test_resuming_a_run_that_wrote_merging_options_is_the_same_recipe(root, tmp_path):
    """A run of an earlier version wrote its method's keys as merging.options (checkpoint and config.yaml):
    resumed from today's command line or from that config.yaml, it is no recipe change."""
    tofu = ["merging.method=tofu", "merging.pyra=false", "merging.tofu={merge_from: 1, mlerp: true}"]
    out = tmp_path / "out"
    assert train_script.main(args(root, out, "train.epochs=2", *tofu)) == 0
    run = run_folder(out)
    (run / "final.json").unlink()
    ckpt = torch.load(run / "last.pth", weights_only=True)
    for key in ("config", "resolved_config"):                        # as an earlier version saved them
        assert ckpt[key]["merging"]["tofu"] == {"merge_from": 1, "mlerp": True}
        ckpt[key]["merging"] = {("options" if k == "tofu" else k): v for k, v in ckpt[key]["merging"].items()}
    torch.save(ckpt, run / "last.pth")
    text = (run / "config.yaml").read_text()
    assert "  tofu:\n" in text and "options" not in text
    (run / "config.yaml").write_text(text.replace("  tofu:\n", "  options:\n"))
    other = copy_run(out, tmp_path / "other")
    saved = tmp_path / "saved.yaml"
    saved.write_text((run_folder(other) / "config.yaml").read_text().replace(str(out), str(other)))
    assert train_script.main(args(root, out, "train.epochs=2", *tofu, "--resume", "auto")) == 0
    assert train_script.main(["--config", str(saved), "--resume", "auto"]) == 0
    for folder in (run, run_folder(other)):
        assert (folder / "final.json").exists() and "config changed" not in (folder / "train.log").read_text()
        assert yaml.safe_load((folder / "config.yaml").read_text())["merging"]["tofu"] == {"merge_from": 1,
                                                                                           "mlerp": True}


def test_allowed_config_change_is_recorded_and_uses_the_new_schedule(root, killed_run, tmp_path):
    out = copy_run(killed_run, tmp_path / "out")
    assert train_script.main(args(root, out, "train.epochs=3", "--resume", "auto", "--allow-config-change")) == 0
    run = run_folder(out)
    assert "config changed at epoch 2 (resume): train.epochs: 2 -> 3" in (run / "train.log").read_text()
    assert "# config changed at epoch 2 (resume): train.epochs: 2 -> 3" in (run / "config.yaml").read_text()
    cfg = load_config(CONFIG, args(root, out, "train.epochs=3")[2:])
    model = create_model("vit", num_classes=10, embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16)
    scheduler = build_scheduler(build_optimizer(model, cfg.optim), cfg.sched, 3)
    scheduler.step(2)
    epoch2 = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()][2]
    assert epoch2["epoch"] == 2 and epoch2["train_lr"] == pytest.approx(scheduler.optimizer.param_groups[0]["lr"])
    assert load_config(run / "config.yaml").train.epochs == 3


# 2. evaluation refuses a checkpoint that does not fit -------------------------------------------------------
def test_eval_refuses_a_checkpoint_of_another_peft(root, killed_run, capsys, tmp_path):
    best = run_folder(killed_run) / "best.pth"
    base = ["--config", CONFIG, "--checkpoint", str(best), f"data.root={root}", "data.task=digits", *TINY,
            "--runs", "1", "--batch-size", "8"]
    assert eval_script.main([*base, "peft.type=adapter"]) == 2
    err = error_line(capsys)
    assert "lacks" in err and "adapter" in err and str(best) in err
    out = tmp_path / "r.json"
    assert eval_script.main([*base, "peft.type=adapter", "--allow-missing", "--json", str(out)]) == 0
    assert any(".adapter." in k for k in json.loads(out.read_text())["missing_parameters"])
    bad = tmp_path / "no_tensor.pth"
    torch.save({"model": {"head.weight": 5}}, bad)
    assert eval_script.main([*base[:2], "--checkpoint", str(bad), *base[4:]]) == 2
    assert "holds no tensor" in error_line(capsys)


# 3. bad files get one clear line ------------------------------------------------------------------------------
def bad_files(folder):
    folder.mkdir()
    files = {}
    files["text"] = folder / "notes.pth"
    files["text"].write_text("these are my notes\n")
    files["html"] = folder / "page.pth"
    files["html"].write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    files["tensor"] = folder / "tensor.pth"
    torch.save(torch.zeros(2), files["tensor"])
    files["list"] = folder / "list.pth"
    torch.save([1, 2], files["list"])
    files["safetensors"] = folder / "junk.safetensors"
    files["safetensors"].write_bytes(b"\x10\x00\x00\x00junk")
    files["empty"] = folder / "empty.pth"
    files["empty"].write_bytes(b"")
    good = folder / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    files["truncated"] = folder / "truncated.pth"
    files["truncated"].write_bytes(good.read_bytes()[:2000])
    files["directory"] = folder / "dir.pth"
    files["directory"].mkdir()
    files["missing"] = folder / "missing.pth"
    return files


EXPECT = {"text": "text file", "html": "HTML", "tensor": "holds a Tensor", "list": "holds a list",
          "safetensors": "safetensors", "empty": "empty (0 bytes)", "truncated": "truncated",
          "directory": "is a directory", "missing": "not found"}


@pytest.mark.parametrize("where", ["checkpoint", "pretrained", "resume"])
def test_bad_files_get_one_clear_line(root, killed_run, tmp_path, capsys, where):
    for kind, path in bad_files(tmp_path / "bad").items():
        out = tmp_path / f"out_{kind}"
        if where == "checkpoint":
            rc = eval_script.main(["--config", CONFIG, "--checkpoint", str(path), f"data.root={root}",
                                   "data.task=digits", *TINY, "--no-accuracy", "--runs", "1"])
        elif where == "pretrained":
            rc = train_script.main(args(root, out, f"model.pretrained={path}"))
            assert not out.exists()                                  # no half-made run folder
        else:
            rc = train_script.main(args(root, out, "--resume", str(path)))
        err = error_line(capsys)
        assert rc == 2, (kind, err)
        assert str(path) in err and EXPECT[kind] in err, (kind, err)
        assert len(err.strip().splitlines()) <= 2, err
        if kind in ("text", "html"):
            assert "unsafe" not in err and "unpickling" not in err


def test_truncated_last_checkpoint_points_to_best(root, killed_run, tmp_path, capsys):
    out = copy_run(killed_run, tmp_path / "out")
    last = run_folder(out) / "last.pth"
    last.write_bytes(last.read_bytes()[:1000])
    assert train_script.main(args(root, out, "train.epochs=2", "--resume", "auto")) == 2
    err = error_line(capsys)
    assert "truncated" in err and "best.pth is intact" in err and "--resume" in err


# 4. one run per folder ----------------------------------------------------------------------------------------
def start(root, out, *extra):
    cmd = [sys.executable, str(REPO / "train.py"), *args(root, out, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, text, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_second_run_in_a_busy_folder_is_refused_and_a_dead_lock_taken_over(root, tmp_path, capsys):
    proc = start(root, tmp_path, "train.epochs=50", "train.batch_size=10")
    try:
        wait_for(run_folder(tmp_path) / "train.log", "epoch 0 step", proc)
        assert train_script.main(args(root, tmp_path, "train.epochs=50", "train.batch_size=10",
                                      "--resume", "auto")) == 2
        err = error_line(capsys)
        assert "in use by another run" in err and f"PID {proc.pid}" in err and "host" in err and "started" in err
    finally:
        proc.kill()
        proc.wait()
    assert train_script.main(args(root, tmp_path, "train.epochs=1", "train.batch_size=10", "--overwrite")) == 0
    assert "took over the lock left by a run that is no longer alive (host" in \
        (run_folder(tmp_path) / "train.log").read_text()


# 5. class counts agree ------------------------------------------------------------------------------------------
def test_label_beyond_the_eval_classes_is_an_error(tmp_path, capsys):
    data = tmp_path / "data"
    write_digits(data, "digits")
    lst = data / "digits" / "train800val200.txt"
    lines = lst.read_text().splitlines()
    lines[6] = lines[6].rsplit(" ", 1)[0] + " 99"
    lst.write_text("\n".join(lines) + "\n")
    assert train_script.main(args(data, tmp_path / "o0", "train.epochs=1")) == 2      # classes.txt: 10 classes
    assert f"{lst}:7: label 99 outside [0, 10)" in error_line(capsys)
    (data / "digits" / "classes.txt").unlink()                                    # now read from the labels
    assert train_script.main(args(data, tmp_path / "o", "train.epochs=1")) == 2
    err = error_line(capsys)
    assert f"{lst}:7: label 99 means 100 classes" in err and "test.txt has 10" in err
    assert train_script.main(args(data, tmp_path / "o2", "train.epochs=1", "data.num_classes=100")) == 0


# 6. Ctrl-C saves like SIGTERM -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_saves_resumably_and_exits_nonzero(root, tmp_path, sig, code):
    proc = start(root, tmp_path, "train.epochs=2", "train.batch_size=4")
    wait_for(run_folder(tmp_path) / "train.log", "epoch 0 step", proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == code, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    ckpt = torch.load(run_folder(tmp_path) / "last.pth", weights_only=True)
    assert ckpt["next_epoch"] == 0 and ckpt["epoch_state"]["step"] > 0
    assert train_script.main(args(root, tmp_path, "train.epochs=2", "train.batch_size=4", "--resume", "auto")) == 0


# 7. unwritable places ---------------------------------------------------------------------------------------------
def test_unwritable_output_is_named_before_any_work(root, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(train_script, "build_dataset", lambda *a, **k: built.append(1))
    assert train_script.main(args(root, "/sys/pyra-not-writable")) == 2
    err = error_line(capsys)
    assert "cannot write the run folder /sys/pyra-not-writable" in err and not built


# 8. files follow the umask ----------------------------------------------------------------------------------------
def test_run_files_follow_the_umask(root, killed_run):
    mask = os.umask(0)
    os.umask(mask)
    run = run_folder(killed_run)
    for name in ("best.pth", "last.pth", "config.yaml", "efficiency.json", "log.txt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~mask, name


# 9. small things ---------------------------------------------------------------------------------------------------
def test_overrides_before_and_after_flags(root, killed_run, tmp_path):
    out = copy_run(killed_run, tmp_path / "out")
    argv = args(root, out, "train.epochs=2")
    assert train_script.main([*argv[:4], "--resume", "auto", *argv[4:]]) == 0
    assert (run_folder(out) / "final.json").exists()


def test_clamped_schedule_is_a_warning_with_the_per_layer_result(root, tmp_path):
    assert train_script.main(args(root, tmp_path, "train.epochs=1", "merging.r=[40, 40]")) == 0
    log = (run_folder(tmp_path) / "train.log").read_text()
    assert "warning: merging schedule [40, 40] asks for more tokens" in log and "per layer it becomes [8, 4]" in log


def test_final_speedup_carries_its_spread(root, tmp_path):
    assert train_script.main(args(root, tmp_path, "train.epochs=1", "report.speedup=true")) == 0
    final = json.loads((run_folder(tmp_path) / "final.json").read_text())
    assert final["merged_speedup"] > 0 and final["merged_speedup_spread"] >= 0
    assert final["merged_speedup_reliable"] == (final["merged_speedup_spread"] <= train_script.UNRELIABLE_SPREAD)
    assert "spread" in (run_folder(tmp_path) / "train.log").read_text()


def test_demo_config_without_data_says_how_to_make_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no data/demo here
    assert train_script.main(["--config", CONFIG, "output_dir=o", "train.epochs=2"]) == 2
    assert "python -m data.make_digits" in error_line(capsys)


def test_resuming_from_the_saved_resolved_config_is_the_same_recipe(root, killed_run, tmp_path):
    out = copy_run(killed_run, tmp_path / "out")
    saved = run_folder(out) / "config.yaml"
    text = saved.read_text()
    assert "dim: 4" in text and "r: [4, 2]" in text and "depth: 2" in text and "patch_size: 4" in text
    saved_copy = tmp_path / "saved.yaml"
    saved_copy.write_text(text.replace(str(killed_run), str(out)))
    assert train_script.main(["--config", str(saved_copy), "--resume", "auto"]) == 0
    assert (run_folder(out) / "final.json").exists()

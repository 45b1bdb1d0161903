"""The training pipeline end to end on a tiny ViT and the digits set: it learns, logs the official keys,
resumes exactly after a kill or a pre-emption signal, runs under 2-process DDP, and refuses bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lib.config import load_config
from lib.optim import build_optimizer
from models import create_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.global_pool=avg", "merging.r=[4, 2]", "merging.pyra=true", "peft.dim=4",
        "data.num_workers=0", "train.batch_size=50", "train.eval_batch_size=200",
        "report.benchmark_batch=8", "report.benchmark_seconds=0.05", "sched.warmup_epochs=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def overrides(root, out, *extra):
    return [f"data.root={root}", "data.task=digits", f"output_dir={out}", "experiment=t", *TINY, *extra]


def run_train(root, out, *extra, resume=None, check=True, timeout=300):
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/demo/digits_random.yaml")]
    cmd += (["--resume", resume] if resume else []) + overrides(root, out, *extra)
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def log_lines(run):
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]


def trained_weights(run):
    return torch.load(run / "last.pth", weights_only=True)["model"]


def assert_same_run(a, b):
    wa, wb = trained_weights(a), trained_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la, lb = log_lines(a), log_lines(b)
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb]
    for ra, rb in zip(la, lb):
        assert {k: v for k, v in ra.items() if k != "epoch_time"} == {k: v for k, v in rb.items() if k != "epoch_time"}


def test_end_to_end_learns_and_logs_schema(digits_root, tmp_path):
    run_train(digits_root, tmp_path, "train.epochs=6", "train.eval_interval=2", "optim.lr=1e-3", "peft.type=full",
              "train.batch_size=20")
    run = tmp_path / "t" / "digits" / "seed0"
    lines = log_lines(run)
    assert [r["epoch"] for r in lines] == [0, 2, 4, 5]               # every eval_interval and the last epoch
    for r in lines:
        assert {"train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "epoch", "n_parameters",
                "best_acc1", "epoch_time"} <= r.keys()
    assert lines[-1]["test_acc1"] > 35, lines                         # 10 classes: chance is 10%
    assert lines[-1]["best_acc1"] == max(r["test_acc1"] for r in lines)
    final = json.loads((run / "final.json").read_text())
    assert final["finished"] and final["last_acc1"] == lines[-1]["test_acc1"]
    eff = json.loads((run / "efficiency.json").read_text())
    assert eff["tokens_per_layer"] == [17, 13, 11] and eff["flops"] > 0 and eff["throughput"] > 0
    assert load_config(run / "config.yaml").train.epochs == 6
    ckpt = torch.load(run / "best.pth", weights_only=True)
    assert ckpt["format"] == "pyra-checkpoint" and {"optimizer", "scheduler", "rng", "config"} <= ckpt.keys()
    # a finished run is never overwritten unless asked
    again = run_train(digits_root, tmp_path, "train.epochs=6", check=False)
    assert again.returncode == 3 and "finished run" in again.stderr


def start_until(root, out, extra, line):
    """Start a training run in the background and return it once its train.log shows ``line``."""
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/demo/digits_random.yaml")]
    proc = subprocess.Popen(cmd + overrides(root, out, *extra), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "t" / "digits" / "seed0" / "train.log"
    deadline = time.time() + 240
    while time.time() < deadline and line not in (log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    return proc


def test_resume_after_sigkill_equals_uninterrupted(digits_root, tmp_path):
    extra = ["train.epochs=4", "train.eval_interval=1", "train.batch_size=20"]
    run_train(digits_root, tmp_path / "straight", *extra)
    out = tmp_path / "killed"
    proc = start_until(digits_root, out, extra, "epoch 1 step")
    proc.kill()                                                          # SIGKILL, mid-epoch 1
    proc.wait()
    assert torch.load(out / "t" / "digits" / "seed0" / "last.pth", weights_only=True)["next_epoch"] >= 1
    run_train(digits_root, out, *extra, resume="auto")
    assert_same_run(tmp_path / "straight" / "t" / "digits" / "seed0", out / "t" / "digits" / "seed0")


def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(digits_root, tmp_path):
    extra = ["train.epochs=3", "train.eval_interval=1", "train.batch_size=10"]
    run_train(digits_root, tmp_path / "straight", *extra)
    out = tmp_path / "preempted"
    proc = start_until(digits_root, out, extra, "epoch 1 step 50")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output                # stopped, not finished: 143
    assert "stopped by signal" in output
    state = torch.load(out / "t" / "digits" / "seed0" / "last.pth", weights_only=True)
    assert state["next_epoch"] == 1 and state["epoch_state"]["step"] >= 50   # saved mid-epoch
    # as a run saved before PYRA's parameters were renamed would hold them (blocks.N.pyra.weight_r, ...):
    # the resume is exact from those names too
    earlier = [(".reduction.pyra.to_channel_weight", ".pyra.weight_r"),
               (".reduction.pyra.to_token_weight", ".pyra.weight_d"), (".reduction.pyra.norm.", ".pyra.norm.")]
    renamed = {}
    for key, value in state["model"].items():
        for new, old in earlier:
            key = key.replace(new, old)
        renamed[key] = value
    assert renamed.keys() != state["model"].keys() and "blocks.0.pyra.weight_r" in renamed
    torch.save({**state, "model": renamed}, out / "t" / "digits" / "seed0" / "last.pth")
    run_train(digits_root, out, *extra, resume="auto")
    assert_same_run(tmp_path / "straight" / "t" / "digits" / "seed0", out / "t" / "digits" / "seed0")


def test_ddp_two_processes_matches_single_process(digits_root, tmp_path):
    extra = ["train.epochs=2", "train.eval_interval=1", "peft.dropout=0.0", "model.drop_path_rate=0.0"]
    run_train(digits_root, tmp_path / "single", *extra, "train.batch_size=50")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(REPO / "train.py"), "--config", str(REPO / "configs/demo/digits_random.yaml")]
    cmd += overrides(digits_root, out, *extra, "train.batch_size=50")       # the global batch: 25 per process
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, ddp = log_lines(tmp_path / "single" / "t" / "digits" / "seed0"), log_lines(out / "t" / "digits" / "seed0")
    assert [r["epoch"] for r in ddp] == [0, 1]                              # logged once, by rank 0
    assert (out / "t" / "digits" / "seed0" / "train.log").read_text().count("epoch 1:") == 1
    for a, b in zip(single, ddp):
        assert abs(a["test_acc1"] - b["test_acc1"]) <= 0.3                  # same data order, same global batch
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4                 # the same images in every step
    # the distributed evaluation is exact: a single process evaluating the DDP weights gets the same accuracy
    run = out / "t" / "digits" / "seed0"
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--config", str(run / "config.yaml"),
                           "--checkpoint", str(run / "last.pth"), "--runs", "1", "--json", "-"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["test_acc1"] == ddp[-1]["test_acc1"]
    settings = {(r["setting"], r["lora"]) for r in result["efficiency"]}
    assert settings == {("merged", "unfolded"), ("merged", "folded"), ("no merging", "unfolded"),
                        ("no merging", "folded")}


def test_config_errors_exit_before_work(digits_root, tmp_path):
    proc = run_train(digits_root, tmp_path, "optim.pyra_lrr=1e-3", check=False)
    assert proc.returncode == 2 and "optim.pyra_lr" in proc.stderr
    proc = run_train(digits_root, tmp_path, "train.drop_last=true", "train.batch_size=2000", check=False)
    assert proc.returncode == 2 and "train.batch_size=2000" in proc.stderr
    assert not (tmp_path / "t" / "digits" / "seed0" / "last.pth").exists()


def test_pyra_parameters_get_their_own_group(digits_root):
    cfg = load_config(REPO / "configs/demo/digits_random.yaml", ["optim.pyra_lr=3e-4", "optim.pyra_weight_decay=0.5"])
    model = create_model("vit", num_classes=10, embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16,
                         merging=[4, 2], pyra=True)
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    pyra_ids = {id(p) for n, p in model.named_parameters() if ".reduction.pyra." in n}
    assert {id(p) for p in groups["pyra"]["params"] + groups["pyra_no_decay"]["params"]} == pyra_ids
    pyras = [b.reduction.pyra for b in model.blocks]
    assert {id(p) for p in groups["pyra"]["params"]} == {id(p.to_channel_weight) for p in pyras} | {
        id(p.to_token_weight) for p in pyras}
    assert groups["pyra"]["lr"] == groups["pyra_no_decay"]["lr"] == 3e-4
    assert groups["pyra"]["weight_decay"] == 0.5 and groups["pyra_no_decay"]["weight_decay"] == 0
    assert groups["decay"]["lr"] == cfg.optim.lr and groups["no_decay"]["weight_decay"] == 0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert all(id(p) in no_decay for n, p in model.named_parameters()
               if p.requires_grad and n.endswith("bias") and ".reduction.pyra." not in n)

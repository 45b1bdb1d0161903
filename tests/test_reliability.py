"""Failure behaviour: non-finite loss, gradient clipping, atomic writes, pre-emption signals, cut log
lines and run checkpoints that would execute code."""
import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lib.engine
import train as train_script
from data.make_digits import write_digits
from lib.checkpointing import atomic_write, load_run_checkpoint
from lib.config import load_config
from lib.engine import EpochState, NonFiniteLossError, train_one_epoch
from lib.logger import JsonLog
from models import CheckpointError, create_model

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(root, out, *extra):
    return load_config(REPO / "configs/demo/digits_random.yaml", [
        f"data.root={root}", "data.task=digits", f"output_dir={out}", "experiment=r", "model.img_size=16",
        "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "merging.r=[4, 2]",
        "train.batch_size=100", "train.eval_interval=1", "report.benchmark_batch=4", "report.benchmark_seconds=0.01",
        "report.flops=false", *extra])


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    write_digits(tmp_path / "data", "digits")
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "logs", "train.epochs=3")
    calls = {"n": 0}
    real = F.cross_entropy

    def poisoned(logits, target, **kw):
        loss = real(logits, target, **kw)
        if kw.get("reduction") == "sum":                              # evaluation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 10 + 3 else loss   # 10 steps per epoch: epoch 1, step 3

    monkeypatch.setattr(lib.engine.F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 2"):
        train_script.train(cfg, resume=None, overwrite=False)
    run = tmp_path / "logs" / "r" / "digits" / "seed0"
    ckpt = load_run_checkpoint(run / "last.pth")
    assert ckpt["next_epoch"] == 1 and ckpt["epoch_state"]["step"] == 0   # the end of epoch 0, untouched
    assert [json.loads(line)["epoch"] for line in (run / "log.txt").read_text().splitlines()] == [0]
    assert not (run / "final.json").exists()


def test_gradient_clipping_bounds_the_gradient_norm():
    torch.manual_seed(0)
    model = create_model("vit", num_classes=3, embed_dim=16, depth=1, num_heads=2, patch_size=4, img_size=8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    norms = []
    step = optimizer.step

    def recording_step(*a, **kw):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(*a, **kw)

    optimizer.step = recording_step
    data = [(torch.randn(4, 3, 8, 8) * 100, torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    train_one_epoch(model, data, optimizer, torch.device("cpu"), 0, EpochState(), clip_grad=0.01)
    assert len(norms) == 3 and max(norms) <= 0.01 + 1e-6
    norms.clear()
    train_one_epoch(model, data, optimizer, torch.device("cpu"), 0, EpochState())
    assert max(norms) > 0.01


def test_atomic_write_keeps_old_file_when_writer_dies(tmp_path):
    path = tmp_path / "last.pth"
    path.write_text("old")

    def dying_writer(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dying_writer)
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]          # no temporary file left behind


def test_sigusr1_and_sigterm_request_a_stop():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        for sig in previous:
            flag = train_script.StopFlag(torch.device("cpu"))
            assert not flag()
            os.kill(os.getpid(), sig)
            assert flag() and flag.signal == sig
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_json_log_truncation_drops_later_epochs_and_cut_lines(tmp_path):
    log = JsonLog(tmp_path / "log.txt")
    for epoch in range(3):
        log.append({"epoch": epoch, "test_acc1": float(epoch)})
    with open(tmp_path / "log.txt", "a") as f:
        f.write('{"epoch": 3, "test_ac')                    # killed mid-write
    log.truncate_to(2)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1]


def test_resume_refuses_a_run_checkpoint_that_runs_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "last.pth", "wb") as f:
        pickle.dump({"format": "pyra-checkpoint", "model": Payload()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_run_checkpoint(tmp_path / "last.pth")
    assert not marker.exists()

"""A run's inputs are checked where they enter: configs, names, non-finite numbers, weights and checkpoints
that do not fit, list files, a full disk, and errors under torchrun.

Each case goes through the command line (``train.main`` / ``eval.main`` in-process: the same argument
parsing and error reporting as ``python train.py``; real processes where the process boundary matters) and
asserts the exit code, the one-line message naming the file / key / line, no traceback, and that nothing on
disk changed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train as train_script

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "merging.r=[4, 2]", "train.batch_size=100", "train.eval_interval=1", "report.benchmark_batch=4",
        "report.benchmark_seconds=0.01", "report.flops=false", "sched.warmup_epochs=0", "data.train_split=val200",
        "data.eval_split=val200"]                                    # 2 steps of 100 images per epoch


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` with a hash of its bytes: what "nothing changed" compares."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            out[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's ``main`` like the command line does; (exit code, stderr). No traceback may appear."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def one_error(err: str) -> str:
    """The single ``error: ...`` line of stderr (other lines, e.g. a load report, may precede it)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0]), err  # nothing after it: a one-line error
    return lines[0]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared machine: one thread is several times faster than many fighting for cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_run(digits_root, tmp_path):
    """argv for a tiny random-weights run on the digits (seconds) and the folder it writes."""
    out = tmp_path / "logs"

    def argv(*extra: str, config: Path | str = REPO / "configs/demo/digits_random.yaml") -> list[str]:
        return ["--config", config, f"data.root={digits_root}", f"output_dir={out}", "experiment=t", *TINY, *extra]

    argv.out = out
    argv.run = out / "t" / "digits" / "seed0"
    return argv


# --------------------------------------------------------------------------------------------- configs
def test_config_that_is_binary_not_utf8_or_a_directory_is_one_line_naming_it(tmp_path, tiny_run, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("experiment: caf\xe9\n".encode("latin-1"))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {latin1.name}\n")
    before = snapshot(tmp_path)
    for config, needles in ((binary, ["not a UTF-8 text file", "byte 0x89"]), (latin1, ["not a UTF-8", "0xe9"]),
                            (folder, ["is a directory"]), (child, ["latin1.yaml", f"_base_ of {child}"])):
        code, err = cli(train_script.main, tiny_run(config=config), capsys)
        line = one_error(err)
        assert code == 2 and line.startswith(f"error: {config if config != child else latin1}:"), line
        assert all(n in line for n in needles), line
    assert snapshot(tmp_path) == before


def test_yaml_aliases_cannot_expand_a_small_file_and_messages_show_values_shortened(tmp_path, tiny_run, capsys):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nmerging: {r: *i}\n")      # 1 KB; 9^9 values expanded
    loop = tmp_path / "loop.yaml"
    loop.write_text("merging:\n  r: &x [1, *x]\n")
    fine = tmp_path / "fine.yaml"                                     # an ordinary alias still works
    fine.write_text(f"_base_: {REPO / 'configs/demo/digits_random.yaml'}\noptim: {{lr: &lr 0.01, pyra_lr: *lr}}\n")
    assert bomb.stat().st_size < 1024
    before = snapshot(tmp_path)
    start = time.perf_counter()
    for config, needle in ((bomb, "aliases expand it to more than 10000 values"), (loop, "recursive")):
        code, err = cli(train_script.main, tiny_run(config=config), capsys)
        line = one_error(err)
        assert code == 2 and line.startswith(f"error: {config}:") and needle in line, line
    wide = "[" + ", ".join(["[1, 2, 3]"] * 3000) + "]"                 # a big value inside the limit
    code, err = cli(train_script.main, tiny_run(f"merging.r={wide}"), capsys)
    line = one_error(err)
    assert code == 2 and "merging.r" in line and len(line) < 600, line
    code, err = cli(train_script.main, tiny_run(f"data.task={'x' * 5000}"), capsys)
    assert code == 2 and len(one_error(err)) < 400
    assert time.perf_counter() - start < 20
    assert snapshot(tmp_path) == before
    from lib.config import load_config
    assert load_config(fine).optim.pyra_lr == 0.01


@pytest.mark.parametrize("override, key", [("experiment=a\nb", "experiment"), ("experiment=../../etc", "experiment"),
                                           ("data.task=cifar\tx", "data.task"), ("data.task=../test", "data.task"),
                                           ("data.task=a b", "data.task"), ("experiment=/abs", "experiment")])
def test_names_that_become_folders_are_path_and_shell_safe(override, key, tiny_run, capsys, tmp_path):
    before = snapshot(tmp_path)
    code, err = cli(train_script.main, tiny_run(override), capsys)
    line = one_error(err)
    assert code == 2 and line.startswith(f"error: {key}: ") and "cannot name a folder" in line, line
    assert snapshot(tmp_path) == before


def test_a_name_derived_from_the_config_path_is_checked_too(tmp_path, tiny_run, capsys):
    config = tmp_path / "two\nlines.yaml"
    config.write_text(f"_base_: {REPO / 'configs/demo/digits_random.yaml'}\n")
    argv = [a for a in tiny_run(config=config) if a != "experiment=t"]
    code, err = cli(train_script.main, argv, capsys)
    line = one_error(err).replace("\\n", "\n")
    assert code == 2 and "experiment:" in line and "derived from the config path" in line, line


def test_vtab_sh_refuses_a_newline_in_the_experiment_before_launching(tmp_path):
    log = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ncase \"$*\" in *train.py*) echo called >> {log}; exit 0;; esac\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    config = REPO / "configs/demo/digits_random.yaml"
    proc = subprocess.run(["bash", str(REPO / "scripts/vtab.sh"), "digits", str(config),
                           f"output_dir={tmp_path / 'logs'}", "experiment=x\nseed0 1 2 3"], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": str(python)}, timeout=120)
    assert proc.returncode == 2 and "experiment:" in proc.stderr and "cannot name a folder" in proc.stderr
    assert not log.exists() and not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------- non-finite numbers
@pytest.mark.parametrize("override, key", [("optim.lr=.inf", "optim.lr"),
                                           ("optim.weight_decay=.nan", "optim.weight_decay"),
                                           ("sched.warmup_lr=.inf", "sched.warmup_lr"),
                                           ("optim.clip_grad=.inf", "optim.clip_grad"),
                                           ("optim.betas=[0.9, .nan]", "optim.betas")])
def test_non_finite_config_number_is_an_error_naming_the_key(override, key, tiny_run, capsys, tmp_path):
    before = snapshot(tmp_path)
    code, err = cli(train_script.main, tiny_run(override), capsys)
    assert code == 2 and f"{key}: must be a finite number" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- weights and checkpoints
ARCH = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16)   # the model TINY configures


def backbone(**sizes):
    """A plain ViT with TINY's architecture (or ``sizes``), seeded: the "pretrained" weights of these tests."""
    import torch

    from models import create_model
    torch.manual_seed(1)
    return create_model("vit", num_classes=10, peft="none", global_pool="avg", **{**ARCH, **sizes})


def jax_npz(model, path: Path, **extra) -> Path:
    """``model``'s backbone in Google's ViT ``.npz`` layout (as ViT-B_16.npz), plus ``extra`` arrays."""
    import numpy as np
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0), "cls": sd["cls_token"],
         "embedding/bias": sd["patch_embed.proj.bias"], "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "head/kernel": np.zeros((d, 21843), np.float32), "head/bias": np.zeros(21843, np.float32)}
    for i in range(len(model.blocks)):
        p, b, mha = f"Transformer/encoderblock_{i}/", f"blocks.{i}.", f"Transformer/encoderblock_{i}/" \
                                                                       "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[mha + n + "/kernel"] = sd[b + "attn.qkv.weight"][j * d:(j + 1) * d].T.reshape(d, h, d // h)
            w[mha + n + "/bias"] = sd[b + "attn.qkv.bias"][j * d:(j + 1) * d].reshape(h, d // h)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{**w, **extra})
    return path


def poisoned_state_dict(name: str, value: float) -> dict:
    sd = backbone().state_dict()
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = value
    return sd


def test_non_finite_pretrained_weights_are_refused_at_load(tmp_path, tiny_run, capsys):
    import numpy as np
    import torch
    pth = tmp_path / "nan.pth"
    torch.save({"model": poisoned_state_dict("blocks.1.mlp.fc1.weight", float("nan"))}, pth)
    npz = jax_npz(backbone(), tmp_path / "inf.npz")
    arrays = dict(np.load(npz))
    arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias"][2] = np.inf
    np.savez(npz, **arrays)
    before = snapshot(tmp_path)
    for path, tensor in ((pth, "blocks.1.mlp.fc1.weight"), (npz, "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias")):
        code, err = cli(train_script.main, tiny_run(f"model.pretrained={path}"), capsys)
        line = one_error(err)
        assert code == 2 and line.startswith(f"error: {path}: tensor {tensor!r} holds non-finite values"), line
    assert snapshot(tmp_path) == before                  # no run folder was left behind


def test_eval_refuses_a_checkpoint_with_non_finite_weights(tmp_path, digits_root, capsys):
    import torch

    import eval as eval_script
    from lib.build import build_model
    from lib.config import load_config
    from models import trainable_state_dict
    from models.checkpoint import OWN_FORMAT
    config = REPO / "configs/demo/digits_random.yaml"
    overrides = [f"data.root={digits_root}", *TINY]
    sd = trainable_state_dict(build_model(load_config(config, overrides), 10))
    name = sorted(sd)[-1]
    sd[name] = torch.full_like(sd[name], float("nan"))
    ckpt = tmp_path / "best.pth"
    torch.save({"format": OWN_FORMAT, "model": sd, "next_epoch": 3}, ckpt)
    before = snapshot(tmp_path)
    code, err = cli(eval_script.main, ["--config", config, "--checkpoint", ckpt, *overrides], capsys)
    line = one_error(err)
    assert code == 2 and line.startswith(f"error: {ckpt}: tensor {name!r} holds non-finite values"), line
    assert "top-1" not in err and snapshot(tmp_path) == before


def test_non_finite_loss_stop_names_epoch_step_and_whether_a_checkpoint_exists(tiny_run, capsys, monkeypatch):
    import torch.nn.functional as F

    import lib.engine
    real, calls = F.cross_entropy, {"n": 0, "at": 0}

    def poisoned(logits, target, **kw):
        loss = real(logits, target, **kw)
        if kw.get("reduction") == "sum":                              # evaluation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == calls["at"] else loss

    monkeypatch.setattr(lib.engine.F, "cross_entropy", poisoned)
    calls.update(n=0, at=2)                                           # epoch 0, step 1: nothing saved yet
    code, err = cli(train_script.main, tiny_run("train.epochs=2"), capsys)
    line = one_error(err)
    assert code == 4 and "loss is nan at epoch 0, step 1" in line and "no checkpoint was written" in line, line
    assert "kept" not in line and not tiny_run.out.exists()           # the half-made run folder is gone
    calls.update(n=0, at=2 + 2)                                       # 2 steps per epoch: epoch 1, step 1
    code, err = cli(train_script.main, tiny_run("train.epochs=2"), capsys)
    line = one_error(err)
    last = tiny_run.run / "last.pth"
    assert code == 4 and "loss is nan at epoch 1, step 1" in line and f"{last} (" in line, line
    assert "continues at epoch 1, step 0) is kept" in line and "--resume auto" in line, line


# ------------------------------------------------------------------------------ checkpoints that do not fit
def test_pretrained_file_with_unused_tensors_is_an_error_unless_allow_partial(tmp_path, tiny_run, capsys):
    import torch
    deep_pth = tmp_path / "deep.pth"
    torch.save(backbone(depth=3).state_dict(), deep_pth)
    deep_npz = jax_npz(backbone(depth=3), tmp_path / "deep.npz")
    before = snapshot(tmp_path)
    for path, unused in ((deep_pth, [k for k in backbone(depth=3).state_dict() if k.startswith("blocks.2.")]),
                         (deep_npz, [k for k in __import__("numpy").load(deep_npz).files if "encoderblock_2/" in k])):
        code, err = cli(train_script.main, tiny_run(f"model.pretrained={path}"), capsys)
        line = one_error(err)
        assert code == 2 and line.startswith(f"error: {path}: {len(unused)} tensor(s) of the checkpoint are not used")
        assert all(k in line for k in unused) and "model.allow_partial: true" in line, line
        assert len(unused) == 12 if path == deep_pth else len(unused) == 16
    assert snapshot(tmp_path) == before
    code, err = cli(train_script.main, tiny_run(f"model.pretrained={deep_npz}", "model.allow_partial=true",
                                                "train.epochs=1"), capsys)
    assert code == 0, err
    log = (tiny_run.run / "train.log").read_text()
    assert "unexpected (16): " + ", ".join(sorted(unused)) in log   # every unused tensor named in the report


def test_shape_mismatch_names_the_tensor_and_a_pickled_npz_is_refused_as_such(tmp_path, tiny_run, capsys):
    import numpy as np
    wide = jax_npz(backbone(embed_dim=48), tmp_path / "wide.npz")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pickled = jax_npz(backbone(), tmp_path / "pickled.npz", notes=np.array([Payload()], dtype=object))
    whole = (tmp_path / "pickled.npz").read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole[:len(whole) // 2])
    before = snapshot(tmp_path)
    for path, needles in ((wide, ["model tensor 'patch_embed.proj.weight' is (32, 3, 4, 4)", "(48, 3, 4, 4)"]),
                          (pickled, ["its array 'notes' holds pickled Python objects", "none of it was run"]),
                          (cut, ["truncated or corrupt"])):
        code, err = cli(train_script.main, tiny_run(f"model.pretrained={path}"), capsys)
        line = one_error(err)
        assert code == 2 and str(path) in line and all(n in line for n in needles), line
        assert (path == cut) == ("truncated" in line), line
    assert not marker.exists() and snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ list files
def task_run(tmp_path: Path, *extra: str) -> list[str]:
    """argv for a tiny run on a small generated task ``t`` under ``tmp_path/data`` (write it first)."""
    return ["--config", REPO / "configs/demo/digits_random.yaml", f"data.root={tmp_path / 'data'}", "data.task=t",
            f"output_dir={tmp_path / 'logs'}", "experiment=t", *TINY, "data.train_split=train800",
            "data.eval_split=test", "train.epochs=1", "train.batch_size=4", *extra]


def test_list_file_with_a_utf8_bom_is_read_as_text(tmp_path, make_vtab_task, capsys):
    task = make_vtab_task(tmp_path / "data", "t", sizes={"train800": 20, "val200": 4}, test_size=10)
    for split in ("train800", "test"):
        listing = task / f"{split}.txt"
        listing.write_bytes(b"\xef\xbb\xbf" + listing.read_bytes())     # as Notepad saves UTF-8
    (task / "classes.txt").write_bytes(b"\xef\xbb\xbf" + "".join(f"c{i}\n" for i in range(10)).encode())
    code, err = cli(train_script.main, task_run(tmp_path), capsys)
    assert code == 0, err
    assert (tmp_path / "logs/t/t/seed0/final.json").exists()


@pytest.mark.parametrize("entry, why", [("../u/images/test/000000.png", "goes up out of the task folder"),
                                        ("images/../../u/images/test/000001.png", "goes up out of the task folder"),
                                        ("{root}/u/images/test/000002.png", "is an absolute path"),
                                        ("images/link.png", "symlink"), ("linked/000003.png", "symlink")])
def test_list_entry_leaving_the_task_folder_is_refused_naming_file_and_line(entry, why, tmp_path, make_vtab_task,
                                                                             capsys):
    task = make_vtab_task(tmp_path / "data", "t", sizes={"train800": 5, "val200": 2}, test_size=3)
    make_vtab_task(tmp_path / "data", "u", sizes={"train800": 2, "val200": 2}, test_size=5)   # another task's test
    (task / "images/link.png").symlink_to(tmp_path / "data/u/images/test/000004.png")
    (task / "linked").symlink_to(tmp_path / "data/u/images/test", target_is_directory=True)
    listing = task / "train800.txt"
    lines = listing.read_text().splitlines()
    lines.insert(2, f"{entry.format(root=tmp_path / 'data')} 1")
    listing.write_text("\n".join(lines) + "\n")
    before = snapshot(tmp_path)
    code, err = cli(train_script.main, task_run(tmp_path), capsys)
    line = one_error(err)
    assert code == 2 and line.startswith(f"error: {listing}:3: ") and why in line, line
    assert snapshot(tmp_path) == before


def test_a_task_folder_that_is_itself_a_symlink_still_loads(tmp_path, make_vtab_task):
    from lib.data import ImageListDataset
    make_vtab_task(tmp_path / "elsewhere", "t", sizes={"train800": 3, "val200": 1}, test_size=2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/t").symlink_to(tmp_path / "elsewhere/t", target_is_directory=True)
    assert len(ImageListDataset(tmp_path / "data", "t", "train800")) == 3


# ------------------------------------------------------------------------------------------------ full disk
def records(run: Path) -> list[dict]:
    import json
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time"}
            for line in (run / "log.txt").read_text().splitlines()]


def trained(run: Path) -> dict:
    from lib.checkpointing import load_run_checkpoint
    return load_run_checkpoint(run / "last.pth")["model"]


def no_space() -> OSError:
    import errno
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def reference(digits_root, tmp_path_factory):
    """An uninterrupted 3-epoch tiny run: what a run stopped by a full disk and resumed must equal."""
    import torch
    out, threads = tmp_path_factory.mktemp("reference"), torch.get_num_threads()
    argv = ["--config", REPO / "configs/demo/digits_random.yaml", f"data.root={digits_root}", f"output_dir={out}",
            "experiment=t", *TINY, "train.epochs=3"]
    torch.set_num_threads(1)
    try:
        assert train_script.main([str(a) for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "t/digits/seed0"


def test_full_disk_writing_a_checkpoint_is_one_line_keeps_the_previous_and_resumes_exactly(
        tiny_run, reference, capsys, monkeypatch):
    import pathlib
    real_write, seen = pathlib.Path.write_bytes, {"last": 0, "kept": None}

    def write_bytes(self, data):                       # the second save of last.pth runs out of space half-way
        if self.name.startswith(".last.pth."):
            seen["last"] += 1
            if seen["last"] == 2:
                seen["kept"] = (self.parent / "last.pth").read_bytes()
                real_write(self, bytes(data)[:len(data) // 2])
                raise no_space()
        return real_write(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    code, err = cli(train_script.main, tiny_run("train.epochs=3"), capsys)
    line = one_error(err)
    last = tiny_run.run / "last.pth"
    assert code == 5 and line.startswith(f"error: cannot write {last}: no space left on device"), line
    assert "the previous file is intact" in line and "--resume auto" in line, line
    assert last.read_bytes() == seen["kept"]                             # the end of epoch 0, untouched
    assert not [p for p in tiny_run.run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(pathlib.Path, "write_bytes", real_write)          # space is back
    code, err = cli(train_script.main, [*tiny_run("train.epochs=3"), "--resume", "auto"], capsys)
    assert code == 0, err
    assert records(tiny_run.run) == records(reference)
    assert all(v.equal(trained(reference)[k]) for k, v in trained(tiny_run.run).items())


def test_full_disk_writing_a_log_is_one_line_naming_it_and_resumes_exactly(tiny_run, reference, capsys,
                                                                         monkeypatch):
    import logging
    real_fsync, real_flush = os.fsync, logging.StreamHandler.flush
    armed = {"log.txt": 0, "train.log": 0}

    def fsync(fd):                                      # log.txt: the line of epoch 1 is not on disk
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/log.txt"):
            armed["log.txt"] += 1
            if armed["log.txt"] == 2:
                raise no_space()
        return real_fsync(fd)

    def flush(handler):                                 # train.log: the line after epoch 0's cannot be written
        name = getattr(handler, "baseFilename", "")
        if name.endswith("train.log") and "epoch 0:" in Path(name).read_text():
            armed["train.log"] += 1
            if armed["train.log"] == 2:                 # the 1st is epoch 0's own line
                raise no_space()
        return real_flush(handler)

    for name, patch in (("log.txt", lambda: monkeypatch.setattr(os, "fsync", fsync)),
                        ("train.log", lambda: monkeypatch.setattr(logging.StreamHandler, "flush", flush))):
        patch()
        code, err = cli(train_script.main, tiny_run("train.epochs=3", "--overwrite"), capsys)
        line = one_error(err)
        assert code == 5 and line.startswith(f"error: cannot write {tiny_run.run / name}: no space left"), line
        assert "Logging error" not in err
        monkeypatch.undo()                              # space is back
        code, err = cli(train_script.main, [*tiny_run("train.epochs=3"), "--resume", "auto"], capsys)
        assert code == 0, err
        assert records(tiny_run.run) == records(reference), name


# ------------------------------------------------------------------------------------------------- torchrun
def recording_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in interpreter for the scripts: runs Python, but only records a launch of train.py."""
    log = tmp_path / "launched"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ncase \"$*\" in *train.py*) echo \"$*\" >> {log}; exit 0;; esac\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    return python, log


@pytest.mark.parametrize("script", ["vtab.sh", "vtab_all.sh"])
def test_vtab_scripts_check_nproc_against_the_batch_before_launching(script, tmp_path):
    python, log = recording_python(tmp_path)
    args = ["digits"] if script == "vtab.sh" else []
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args, str(REPO / "configs/demo/digits_random.yaml"),
                           f"output_dir={tmp_path / 'logs'}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": str(python), "NPROC": "3", "TASKS": "digits"})
    assert proc.returncode == 2 and not log.exists() and not (tmp_path / "logs").exists(), proc.stderr
    assert proc.stderr.strip() == (f"{script}: NPROC=3 does not divide train.batch_size=32 (the global batch; each "
                                   f"of the 3 processes takes batch / 3): choose NPROC among the divisors of 32")


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", "optim.lr: must be a finite number >= 0, got inf"),
    ("train.batch_size=30", "--nproc-per-node 4 does not divide train.batch_size=30 (the global batch; each of the 4 "
                            "processes takes batch / 4)"),
])
def test_nproc_per_node_refuses_a_bad_config_once_before_any_process_starts(override, message, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--nproc-per-node", "4", "--config",
                           "configs/demo/digits_random.yaml", override, f"output_dir={tmp_path / 'logs'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {message}\n")
    assert not (tmp_path / "logs").exists()


def test_under_torchrun_a_config_error_is_printed_once_and_the_process_exits_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--config", "configs/demo/digits_random.yaml", "optim.lr=.inf",
                           f"output_dir={tmp_path / 'logs'}"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert output.count("error: optim.lr: must be a finite number >= 0, got inf\n") == 1, output
    root_cause = output.split("Root Cause")[-1]          # torchrun's report: rank 0 failed first, with code 2
    assert "rank      : 0 " in root_cause and "exitcode  : 2" in root_cause, output
    assert "train.py\", line" not in output, output       # no traceback of train.py
    assert not (tmp_path / "logs").exists()

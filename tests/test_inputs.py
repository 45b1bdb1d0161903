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
        "report.benchmark_seconds=0.01", "report.flops=false", "sched.warmup_epochs=0"]


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

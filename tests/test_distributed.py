"""Several processes and clusters, simulated on CPU: which environment starts a process group (srun does,
sbatch does not), the device each process takes, refusals and a non-finite loss ending every rank (2 gloo
processes under torchrun), per-rank random streams that resume exactly, RNG states from more GPUs than
are visible, and the lock on a file system without flock."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lib.checkpointing as checkpointing
import lib.distributed as distributed
import lib.engine
import train as train_script
from lib.config import ConfigError
from lib.distributed import DistInfo, first_host, launch_env, slurm_port
from lib.runs import RunFolderError, RunLock

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo/digits_random.yaml")
TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "merging.r=[4, 2]", "merging.pyra=true", "peft.dim=4", "data.num_workers=0", "train.batch_size=100",
        "train.eval_batch_size=400", "train.eval_interval=1", "report.benchmark_batch=4",
        "report.benchmark_seconds=0.01", "report.flops=false", "sched.warmup_epochs=1", "train.device=cpu"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster than two fighting for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args(root, out, *extra):
    return ["--config", CONFIG, f"data.root={root}", "data.task=digits", f"output_dir={out}", "experiment=d",
            *TINY, *extra]


def run_folder(out) -> Path:
    return Path(out) / "d" / "digits" / "seed0"


def torchrun(script: Path | str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run(cmd + argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# A train.py stand-in for the torchrun tests: the real main, with a poisoned loss or a stop request on demand,
# and every rank's dropout masks written to masks_rank<r>.json.
WRAPPER = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import torch.nn.functional as F
import train

rank = int(os.environ["RANK"])
real_ce, real_dropout = F.cross_entropy, F.dropout
calls, masks = [0], []

def cross_entropy(logits, target, **kw):
    loss = real_ce(logits, target, **kw)
    if kw.get("reduction") == "sum":          # evaluation
        return loss
    calls[0] += 1
    if calls[0] == int(os.environ.get("NAN_AT_CALL", 0)) and rank == int(os.environ["NAN_RANK"]):
        return loss * float("nan")
    if calls[0] == int(os.environ.get("STOP_AT_CALL", 0)) and rank == 0:
        os.kill(os.getpid(), signal.SIGUSR1)  # a pre-emption signal reaching rank 0 only
    return loss

def dropout(x, p=0.5, training=True, inplace=False):
    out = real_dropout(x, p, training, inplace)
    if training and p > 0 and len(masks) < 4:
        masks.append((out == 0).flatten()[:256].int().tolist())
    return out

F.cross_entropy, F.dropout = cross_entropy, dropout
code = train.main(sys.argv[1:])
if "MASKS" in os.environ:
    with open(os.path.join(os.environ["MASKS"], f"masks_rank{{rank}}.json"), "w") as f:
        json.dump(masks, f)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "train_wrapper.py"
    path.write_text(WRAPPER.format(repo=str(REPO)))
    return path


# ------------------------------------------------------------------------------------------- environments
SBATCH = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8", "SLURM_PROCID": "0",
          "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_LOCALID": "0"}


def test_only_an_srun_step_or_torchrun_starts_a_process_group():
    assert launch_env(SBATCH) == {}                                        # sbatch / salloc: one process
    assert launch_env({**SBATCH, "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "0"}) == {}   # srun -n 1
    step = {**SBATCH, "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "2", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_STEP_NODELIST": "gpu[07-08]"}
    env = launch_env(step)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(slurm_port("4242", "2"))}
    assert 10000 <= int(env["MASTER_PORT"]) < 30000 and slurm_port("4243", "2") != slurm_port("4242", "2")
    assert launch_env({**step, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "head"
    torchrun_env = {**step, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_env(torchrun_env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert [first_host(n) for n in ("n1", "gpu[003-004,9],cpu1", "r[1-2]-n[07-09]", "a-1,a-2")] == \
        ["n1", "gpu003", "r1-n07", "a-1"]


def test_each_process_takes_local_rank_modulo_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.local_cuda_index(DistInfo(rank=5, world_size=8, local_rank=3)) == 1     # srun, 2 GPUs
    assert distributed.local_cuda_index(DistInfo(rank=0, world_size=8, local_rank=0)) == 0
    with pytest.raises(ConfigError, match="4 processes on this node but 2 visible GPU"):        # torchrun, 4 on 2
        distributed.local_cuda_index(DistInfo(rank=3, world_size=4, local_rank=3, local_world_size=4))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="no GPU is visible"):
        distributed.local_cuda_index(DistInfo(rank=1, world_size=2, local_rank=1))


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def stopped_run(digits_root, tmp_path_factory):
    """A run under an sbatch-style environment (``--ntasks=8``, no srun step), stopped by SIGUSR1 at step 10."""
    out = tmp_path_factory.mktemp("sbatch")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SBATCH.items():
            mp.setenv(key, value)
        real, calls = lib.engine.F.cross_entropy, [0]

        def stop_at_call_3(logits, target, **kw):
            calls[0] += 1
            if calls[0] == 3 and kw.get("reduction") != "sum":
                os.kill(os.getpid(), signal.SIGUSR1)
            return real(logits, target, **kw)

        mp.setattr(lib.engine.F, "cross_entropy", stop_at_call_3)
        code = train_script.main(args(digits_root, out, "train.epochs=2", "train.batch_size=50"))
    for s, handler in saved.items():
        signal.signal(s, handler)
    assert code == 128 + signal.SIGUSR1
    return out


def test_sbatch_environment_trains_as_one_process(digits_root, stopped_run, tmp_path, monkeypatch,
                                                  restore_signals):
    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    ckpt = torch.load(run_folder(out) / "last.pth", weights_only=True)
    assert ckpt["next_epoch"] == 0 and ckpt["epoch_state"]["step"] == lib.engine.CHECK_EVERY   # stopped at a check
    for key, value in SBATCH.items():
        monkeypatch.setenv(key, value)
    assert train_script.main(args(digits_root, out, "train.epochs=2", "train.batch_size=50", "--resume", "auto")) == 0
    assert not torch.distributed.is_initialized()
    log = (run_folder(out) / "train.log").read_text()
    assert log.count("(device cpu, 1 process(es))") == 2 and (run_folder(out) / "final.json").exists()


def test_checkpoint_with_8_cuda_rng_states_resumes_with_2_visible(digits_root, stopped_run, tmp_path, monkeypatch,
                                                                 restore_signals):
    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    path = run_folder(out) / "last.pth"
    ckpt = torch.load(path, weights_only=True)
    # written by a single process on an 8-GPU node, in the older form (one state, one entry per visible GPU)
    ckpt["rng"] = {**ckpt["rng"][0], "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]}
    torch.save(ckpt, path)
    restored, real_restore = [], train_script.restore_rng

    def two_gpus_visible():   # only while the RNG is restored: the rest of the run stays on the CPU
        mp = pytest.MonkeyPatch()
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 2)
        mp.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((int(state[0]), device)))
        return mp

    def restore_where_2_are_visible(*a, **kw):
        mp = two_gpus_visible()
        try:
            return real_restore(*a, **kw)
        finally:
            mp.undo()

    monkeypatch.setattr(train_script, "restore_rng", restore_where_2_are_visible)
    assert train_script.main(args(digits_root, out, "train.epochs=2", "train.batch_size=50", "--resume", "auto")) == 0
    assert restored == [(0, 0), (1, 1)] and (run_folder(out) / "final.json").exists()
    # a rank's own state (a tensor) goes to this process's device
    restored.clear()
    mp = two_gpus_visible()
    try:
        checkpointing.set_rng_state({**ckpt["rng"], "cuda": torch.full((16,), 5, dtype=torch.uint8)},
                                    torch.device("cuda", 1))
    finally:
        mp.undo()
    assert restored == [(5, torch.device("cuda", 1))]


# ---------------------------------------------------------------------------------------------- the lock
@pytest.mark.parametrize("code, message", [(errno.ENOLCK, "the file system does not support flock"),
                                           (errno.EWOULDBLOCK, "is in use by another run")])
def test_lock_failure_names_its_cause(tmp_path, monkeypatch, code, message):
    def refuse(f, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(RunFolderError, match=message):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists() or code == errno.EWOULDBLOCK


# -------------------------------------------------------------------------------- two processes (torchrun)
def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]


def exit_codes(proc: subprocess.CompletedProcess) -> list[int]:
    """Each rank's exit code, from torchrun's failure summary (torchrun itself exits 1)."""
    return sorted(int(line.split(":")[1].split()[0]) for line in proc.stderr.splitlines()
                  if line.strip().startswith("exitcode  :"))


def test_refusal_on_rank_0_ends_both_ranks(digits_root, tmp_path):
    """Through ``train.py --nproc-per-node 2`` (torchrun's machinery): the refusal's own exit code and line."""
    run_folder(tmp_path).mkdir(parents=True)
    (run_folder(tmp_path) / "final.json").write_text('{"finished": true}')
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--nproc-per-node", "2",
                           *args(digits_root, tmp_path, "train.epochs=1")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 60                       # every rank ended within the minute
    assert proc.returncode == 3, proc.stdout + proc.stderr      # the refusal's code, not a launcher's 1
    assert proc.stdout == "" and proc.stderr.splitlines() == [
        f"error: {run_folder(tmp_path)} holds a finished run ({run_folder(tmp_path) / 'final.json'}); "
        f"pass --overwrite to train it again"]                  # once, and nothing else: no launcher report


def test_non_finite_loss_on_rank_1_only_ends_both(digits_root, tmp_path, wrapper):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
         *args(digits_root, tmp_path, "train.epochs=2", "train.batch_size=50")],
        cwd=REPO, env={**ENV, "NAN_AT_CALL": "3", "NAN_RANK": "1"}, capture_output=True, text=True, timeout=120)
    lines = error_lines(proc)
    codes = exit_codes(proc)
    assert codes and set(codes) == {4} and len(lines) == 1, proc.stdout + proc.stderr   # printed once, by rank 0
    assert "loss is nan at epoch 0, step 2 on rank 1" in lines[0]
    assert not (run_folder(tmp_path) / "last.pth").exists()


# --------------------------------------------------------- two processes, started once for several runs
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, runs: list[tuple[list[str], int, int]], results: Path) -> None:
    """One of 2 gloo ranks: ``train.main(argv)`` for each run (its own rendezvous port) with the dropout
    masks recorded and, on rank 0, a pre-emption signal at a given training step (0: none)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)  # two ranks on a small machine: one core each
    real_ce, real_dropout = F.cross_entropy, F.dropout
    calls, masks, stop_at = [0], [], [0]

    def cross_entropy(logits, target, **kw):
        if kw.get("reduction") != "sum":
            calls[0] += 1
            if calls[0] == stop_at[0] and rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
        return real_ce(logits, target, **kw)

    def dropout(x, p=0.5, training=True, inplace=False):
        out = real_dropout(x, p, training, inplace)
        if training and p > 0 and len(masks) < 4:
            masks.append((out == 0).flatten()[:256].int().tolist())
        return out

    F.cross_entropy, F.dropout = cross_entropy, dropout
    codes = []
    for argv, port, stop_at_call in runs:
        os.environ["MASTER_PORT"] = str(port)
        calls[0], stop_at[0] = 0, stop_at_call
        masks.clear()
        codes.append(train_script.main(argv))
        (results / f"masks_run{len(codes)}_rank{rank}.json").write_text(json.dumps(masks))
    (results / f"codes_rank{rank}.json").write_text(json.dumps(codes))


def two_ranks(runs: list[tuple[list[str], int]], results: Path) -> list[list[int]]:
    """Exit codes, per run, of 2 gloo ranks running ``train.main(argv)`` for each ``(argv, stop_at_call)``."""
    runs = [(argv, _free_port(), stop) for argv, stop in runs]
    torch.multiprocessing.spawn(_rank_main, args=(runs, results), nprocs=2, join=True)
    per_rank = [json.loads((results / f"codes_rank{r}.json").read_text()) for r in range(2)]
    return [list(codes) for codes in zip(*per_rank)]


def test_ranks_draw_their_own_dropout_masks_and_resume_to_identical_weights(digits_root, tmp_path):
    run = ["train.epochs=2", "train.batch_size=50", "peft.dropout=0.5", "model.drop_path_rate=0.2"]
    stopped = tmp_path / "stopped"
    # 20 steps per epoch: a SIGUSR1 to rank 0 at epoch 1, step 1 stops both ranks at their next flag check
    codes = two_ranks([(args(digits_root, tmp_path / "straight", *run), 0),
                       (args(digits_root, stopped, *run), 20 + 2),
                       (args(digits_root, stopped, *run, "--resume", "auto"), 0)], tmp_path)
    assert codes == [[0, 0], [128 + signal.SIGUSR1] * 2, [0, 0]]
    masks = [json.loads((tmp_path / f"masks_run1_rank{r}.json").read_text()) for r in range(2)]
    assert len(masks[0]) == 4 and masks[0] != masks[1]                 # seed + rank: each rank its own stream
    straight = torch.load(run_folder(tmp_path / "straight") / "last.pth", weights_only=True)
    resumed = torch.load(run_folder(stopped) / "last.pth", weights_only=True)
    assert len(resumed["rng"]) == 2 and "resumed: epoch 1, step 10" in (run_folder(stopped) / "train.log").read_text()
    assert straight["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])


# ------------------------------------------------------------------------------------------- SLURM arrays
def test_slurm_array_requests_cores_for_every_process_and_worker_and_the_configured_memory(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"_base_: {REPO / 'configs' / 'demo' / 'digits.yaml'}\n")
    out = tmp_path / "out"

    def array(*extra: str, **env: str) -> str:
        flags = [e for e in extra if e.startswith("--")]
        overrides = [e for e in extra if not e.startswith("--")]
        proc = subprocess.run(["bash", str(REPO / "scripts" / "vtab_all.sh"), "--slurm", *flags, str(config),
                               f"output_dir={out}", "data.num_workers=3", *overrides],
                              env={**ENV, "TASKS": "dtd", **env}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return (out / "tiny" / "slurm" / "vtab_all.sbatch").read_text()

    text = array("train.slurm_mem=64G", NPROC="2")
    assert "#SBATCH --gres=gpu:2" in text and "#SBATCH --cpus-per-task=8" in text and "#SBATCH --mem=64G" in text
    text = array("--sbatch=--mem=10G", "--sbatch=--cpus-per-task=2")     # an explicit option wins
    assert "#SBATCH --cpus-per-task=4" not in text and "#SBATCH --cpus-per-task=2" in text
    assert "#SBATCH --mem=10G" in text and text.count("--mem") == 1
    with pytest.raises(ConfigError, match="train.slurm_mem"):
        from lib.config import load_config
        load_config(CONFIG, ["train.slurm_mem=lots"])

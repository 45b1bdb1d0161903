#!/usr/bin/env python
"""Adapt a pretrained ViT to one task with PEFT + ToMe (+ PYRA) and log what the paper reports.

    python train.py                                   # the CPU demo (configs/demo/digits.yaml)
    python train.py --config configs/vit_b16/lora_pyra_high.yaml data.task=cifar
    python train.py --nproc-per-node 4 --config ... --resume auto   # 4 processes (torchrun's machinery)

Outputs go to ``<output_dir>/<experiment>/<task>/seed<k>/``: log.txt (JSON per evaluated epoch), train.log,
config.yaml, efficiency.json, last.pth, best.pth and, once finished, final.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from lib.benchmark import count_flops, measure_throughput, merged_speedup, tokens_per_layer
from lib.build import build_model
from lib.checkpointing import (
    DiskFullError,
    atomic_write,
    is_disk_full,
    load_run_checkpoint,
    rng_state,
    save_run_checkpoint,
    seed_everything,
    set_rng_state,
)
from lib.config import (
    DEFAULTS,
    ConfigError,
    config_to_dict,
    current_form,
    load_config,
    resolve_config,
    save_config,
)
from lib.data import DataError, build_dataset, canonical_task, check_class_counts
from lib.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    cleanup,
    init_distributed,
    is_main,
    launch_env,
    launch_workers,
    on_main,
    select_device,
)
from lib.engine import EpochState, NonFiniteLossError, apply_tf32, compile_model, evaluate, train_one_epoch
from lib.loaders import GlobalBatchSampler, build_eval_loader, build_train_loader
from lib.logger import JsonLog, TensorBoardLog, setup_logger
from lib.optim import build_optimizer, build_scheduler
from lib.runs import RunFolderError, RunLock, check_writable, config_changes
from models import CheckpointError, param_report, trainable_state_dict
from models.checkpoint import check_checkpoint_file, rename_earlier_keys
from models.reduction import learned_records

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo" / "digits.yaml"
EXIT_CONFIG, EXIT_EXISTS, EXIT_NONFINITE, EXIT_NO_SPACE = 2, 3, 4, 5
PEER_EXIT_DELAY_S = 10.0  # under torchrun, how long a process other than rank 0 waits before exiting on an error
UNRELIABLE_SPREAD = 0.25  # per-round speed-up ratios spread wider than this: the timing is not trustworthy
# what rank 0 may refuse a run with; every rank then raises the same error (main's exit codes apply)
REFUSALS = (ConfigError, CheckpointError, RunFolderError, FileExistsError, DataError)
RUN_FILES = ("log.txt", "train.log", "config.yaml", "efficiency.json", "last.pth", "best.pth", "final.json")

log = logging.getLogger("pyra")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"YAML experiment (default: the CPU demo, {DEMO_CONFIG.name})")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from last.pth of this run ('auto': if there is one) or from PATH")
    p.add_argument("--overwrite", action="store_true", help="replace an existing (even finished) run")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the run's in result-changing keys; the change "
                        "and the epoch it took effect are recorded in train.log and config.yaml")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="start N processes on this node (one per GPU, or CPU processes with train.device=cpu); the "
                        "config is checked once before they start, and a failure ends with its own exit code")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the flags


def run_dir(cfg: Any) -> Path:
    """``<output_dir>/<experiment>/<task>/seed<k>/``: the seed is part of a run's identity, so runs of
    different seeds never share a folder (and resume / skip-finished work per seed)."""
    return Path(cfg.output_dir) / cfg.experiment / canonical_task(cfg.data.task) / f"seed{cfg.seed}"


def prepare_run_dir(out: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Decide what an existing folder means: refuse to clobber, resume, or start over. Returns the
    checkpoint to resume from, if any."""
    finished, last = out / "final.json", out / "last.pth"
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        return Path(resume) if resume not in (None, "auto") else None
    if finished.exists():
        raise FileExistsError(f"{out} holds a finished run ({finished}); pass --overwrite to train it again")
    if resume == "auto":
        return last if last.exists() else None
    if resume is not None:
        check_checkpoint_file(resume)
        return Path(resume)
    if last.exists():
        raise FileExistsError(f"{out} holds an unfinished run ({last}); pass --resume auto to continue it "
                              f"or --overwrite to start over")
    return None


def efficiency_report(model: nn.Module, cfg: Any, device: torch.device) -> dict[str, Any]:
    """Parameters, fvcore FLOPs, throughput at the batch actually used, and tokens per layer."""
    params = param_report(model)
    out: dict[str, Any] = {
        "n_parameters": params["total"][1], "total_parameters": params["total"][0],
        "parameters": {k: {"total": v[0], "trainable": v[1]} for k, v in params.items()},
        "tokens_per_layer": tokens_per_layer(model, cfg.model.img_size),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": cfg.train.precision,
    }
    if cfg.report.flops:
        out["flops"] = count_flops(model, cfg.model.img_size)
        out["gflops"] = out["flops"] / 2 ** 30
    speed = measure_throughput(model, cfg.report.benchmark_batch, cfg.model.img_size, device, cfg.train.precision,
                               warmup=1, runs=3, min_seconds=cfg.report.benchmark_seconds)
    out["throughput"], out["throughput_batch"] = speed["images_per_s"], speed["batch_size"]
    return out


def log_efficiency(eff: dict[str, Any]) -> None:
    rows = [f"  {k:<9} {v['total']:>12,} total {v['trainable']:>10,} trainable" for k, v in eff["parameters"].items()]
    log.info("parameters:\n" + "\n".join(rows))
    if "flops" in eff:
        log.info(f"FLOPs (fvcore, one image): {eff['flops'] / 1e9:.3f}e9 = {eff['gflops']:.3f} GFLOPs (/2^30)")
    log.info(f"throughput: {eff['throughput']:.1f} images/s at batch {eff['throughput_batch']} "
             f"({eff['device']}, {eff['precision']})")
    log.info(f"tokens per layer: {eff['tokens_per_layer']}")


class StopFlag:
    """Set by Ctrl-C (SIGINT) and SIGTERM/SIGUSR1 (cluster pre-emption): training stops at its next flag
    check (within ``lib.engine.CHECK_EVERY`` steps, the same step on every rank), checkpoints and exits.

    ``signal`` is the number received (on any rank), so the process can exit with 128 + it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.signal: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __call__(self) -> bool:
        if torch.distributed.is_initialized():  # all ranks stop together, at the same step
            flag = torch.tensor([float(self.signal or 0)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signal = int(flag.item()) or None
        return self.signal is not None


def _speed_text(speed: dict[str, Any]) -> str:
    text = f"{speed['speedup']:.2f}x images/s (spread {100 * speed['spread']:.0f}% over {speed['rounds']} rounds"
    if speed["spread"] > UNRELIABLE_SPREAD:
        text += "; UNRELIABLE: the machine was busy, rerun eval.py on an idle one"
    return text + ")"


def start_run(cfg: Any, resume: str | None, overwrite: bool, allow_change: bool
              ) -> tuple[Path, RunLock | None, dict[str, Any] | None, list[str], Path | None]:
    """Everything that can refuse a run, before any file of the run changes (rank 0 only).

    Returns the run folder, its lock, the checkpoint to resume from (read and checked), the config
    changes accepted with ``--allow-config-change`` (as log lines) and the top folder the run created.
    """
    if cfg.model.pretrained:
        check_checkpoint_file(cfg.model.pretrained)  # before the dataset is built or a folder is made
    out = run_dir(cfg)
    made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # top folder this run creates
    check_writable(out)
    try:
        lock = RunLock(out).acquire()
    except RunFolderError:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    try:
        resume_from = prepare_run_dir(out, resume, overwrite)
        ckpt, changes = None, []
        if resume_from is not None:
            ckpt = load_run_checkpoint(resume_from)
            diff = config_changes(*_comparable(ckpt, cfg), defaults=DEFAULTS)
            if diff and not allow_change:
                lines = "\n  ".join(f"{k}: run {a!r} -> now {b!r}" for k, a, b in diff)
                raise ConfigError(f"resuming {resume_from} with a different recipe changes its results; "
                                  f"{len(diff)} key(s) differ:\n  {lines}\nuse the run's own config, or pass "
                                  f"--allow-config-change to continue with the new values (recorded)")
            epoch = ckpt["next_epoch"]
            changes = [f"config changed at epoch {epoch} (resume): {k}: {a!r} -> {b!r}" for k, a, b in diff]
    except BaseException:
        lock.release(remove=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return out, lock, ckpt, changes, made


def _kept_checkpoint(out: Path, removed: bool) -> str:
    """What a run stopped by a non-finite loss leaves to continue from (said as it is: there may be none)."""
    last = out / "last.pth"
    if not last.exists():
        gone = " (the run folder was removed)" if removed else ""
        return f"no checkpoint was written{gone}; lower optim.lr or set optim.clip_grad and start again"
    try:
        ckpt = load_run_checkpoint(last)
        where = f"epoch {ckpt['next_epoch']}, step {ckpt.get('epoch_state', {}).get('step', 0)}"
    except CheckpointError:
        return f"{last} exists but cannot be read"
    return (f"{last} (from before the failure: it continues at {where}) is kept; lower optim.lr or set "
            f"optim.clip_grad and continue with --resume auto --allow-config-change")


def _comparable(ckpt: dict[str, Any], cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's config and ``cfg`` in the same form: resolved (what the model really has) when the
    checkpoint recorded that, so ``--config <run>/config.yaml`` resumes the run it came from; the run's in
    today's spelling (``current_form``: a run that wrote ``merging.options`` has the same recipe)."""
    if "resolved_config" not in ckpt:
        return current_form(ckpt.get("config", {})), config_to_dict(cfg)
    probe = build_model(cfg, num_classes=1, pretrained=False)  # random weights: only its shape matters
    return current_form(ckpt["resolved_config"]), config_to_dict(resolve_config(cfg, probe))


def write_learned_records(model: nn.Module, out: Path) -> None:
    """What a reduction method learned (DiffRate's search: diffrate_rates.json), beside the checkpoint it matches."""
    for stem, record in learned_records(model).items():
        atomic_write(out / f"{stem}.json", lambda tmp, r=record: Path(tmp).write_text(json.dumps(r, indent=2)))


def write_run_config(cfg: Any, path: Path, history: list[str]) -> None:
    """config.yaml with the recorded config changes as comment lines under its header."""
    save_config(cfg, path)
    if history:
        header, _, body = path.read_text().partition("\n")
        text = header + "\n" + "".join(f"# {line}\n" for line in history) + body
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def train(cfg: Any, resume: str | None, overwrite: bool, allow_change: bool = False) -> dict[str, Any]:
    dist = init_distributed(device_type(cfg.train.device))
    device = select_device(cfg.train.device, dist)
    stop = StopFlag(device)
    opened: dict[str, Any] = {}

    def open_run() -> tuple[dict[str, Any] | None, list[str]]:
        _, opened["lock"], ckpt, changes, opened["made"] = start_run(cfg, resume, overwrite, allow_change)
        return ckpt, changes

    ckpt, changes = on_main(open_run, REFUSALS)  # a refusal on rank 0 ends every rank with its message
    out, lock, made = run_dir(cfg), opened.get("lock"), opened.get("made")
    try:
        return _train(cfg, dist, device, stop, out, lock, ckpt, changes)
    except BaseException as e:
        removed = made is not None and not (out / "last.pth").exists()
        if removed:  # failed before any checkpoint: no half-made run
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(e, NonFiniteLossError) and is_main():
            raise NonFiniteLossError(f"{e}; {_kept_checkpoint(out, removed)}") from None
        raise
    finally:
        if lock is not None:
            lock.release()


def device_type(name: str) -> str:
    """``cuda`` or ``cpu``: what ``train.device`` resolves to (the process group's backend follows it)."""
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


@dataclass
class Training:
    """What the epochs train with, built once per run."""

    model: nn.Module                     # the module checkpointed and evaluated
    step_model: nn.Module                # what the training steps call (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    sampler: GlobalBatchSampler
    eval_loader: DataLoader
    eval_model: nn.Module                # what evaluation calls (compiled when train.compile is on)


@dataclass
class Progress:
    """Where a run is: the next epoch, how far into it, the best accuracy so far, and the recorded config changes."""

    next_epoch: int = 0
    epoch_state: EpochState = field(default_factory=EpochState)
    best: dict[str, Any] = field(default_factory=lambda: {"acc1": -1.0, "epoch": -1})
    history: list[str] = field(default_factory=list)


@dataclass
class RunFiles:
    """The run folder's writers: checkpoints, log.txt (and TensorBoard) — rank 0 writes, other ranks skip."""

    out: Path
    cfg: Any
    resolved: Any
    json_log: JsonLog
    board: TensorBoardLog | None
    device: torch.device

    def save(self, path: Path, parts: Training, progress: Progress, next_epoch: int, state: EpochState) -> None:
        """A checkpoint with every rank's RNG state (called on every rank: the states are gathered)."""
        rngs = all_gather_objects(rng_state(self.device))
        if not is_main():
            return
        save_run_checkpoint(
            path, model=trainable_state_dict(parts.model), optimizer=parts.optimizer.state_dict(),
            scheduler=parts.scheduler.state_dict(), scaler=parts.scaler.state_dict() if parts.scaler else None,
            next_epoch=next_epoch, epoch_state=vars(state).copy(), best=progress.best, rng=rngs,
            config=config_to_dict(self.cfg), resolved_config=config_to_dict(self.resolved),
            config_history=progress.history)

    def record_epoch(self, record: dict[str, Any] | None) -> None:
        if is_main() and record is not None:
            self.json_log.append(record)
            if self.board is not None:
                self.board.append(record)


def _train(cfg: Any, dist: DistInfo, device: torch.device, stop: StopFlag, out: Path, lock: RunLock | None,
           ckpt: dict[str, Any] | None, changes: list[str]) -> dict[str, Any]:
    """One run from its checked start to final.json: data, model, the epochs, the summary."""
    setup_logger(out / "train.log", is_main())
    log.info(f"run: {out}  (device {device}, {dist.world_size} process(es))")
    if lock is not None and lock.note():
        log.info(lock.note())
    history = list(ckpt.get("config_history", [])) if ckpt else []
    for line in changes:
        log.warning(line)
    execution = execution_switches(cfg)
    train_set, eval_set = build_datasets(cfg, dist)
    model = build_model(cfg, train_set.num_classes).to(device)
    eff = {**efficiency_report(model, cfg, device), **execution}
    log_efficiency(eff)
    resolved = resolve_config(cfg, model)  # the rank, per-layer r and sizes that really train
    if is_main():
        write_run_config(resolved, out / "config.yaml", history + changes)
        atomic_write(out / "efficiency.json", lambda tmp: Path(tmp).write_text(json.dumps(eff, indent=2)))
    parts = build_training(cfg, model, train_set, eval_set, dist, device)
    files = RunFiles(out, cfg, resolved, JsonLog(out / "log.txt"), open_board(cfg, out), device)
    progress = Progress(history=history + changes)
    seed_everything(cfg.seed + dist.rank)  # the model is built (the same on every rank): now a stream per rank
    if ckpt is not None:
        progress = restore(ckpt, parts, changes, out, progress.history)
        restore_rng(ckpt["rng"], dist, device, cfg.seed + 1000 * (progress.next_epoch + 1))
        if is_main():
            files.json_log.truncate_to(progress.next_epoch)
        log.info(f"resumed: epoch {progress.next_epoch}, step {progress.epoch_state.step}")
    wrap_for_steps(cfg, parts, dist, device)
    if stop():
        log.info(f"stopped by signal {stop.signal} before training started; nothing to save")
        return {"interrupted": True, "signal": stop.signal}
    interrupted = train_epochs(cfg, parts, progress, files, stop, eff["n_parameters"], device)
    if files.board is not None:
        files.board.close()
    return interrupted or finish(cfg, parts.model, progress, out, device)


def execution_switches(cfg: Any) -> dict[str, Any]:
    """Apply train.tf32 and log how steps execute (precision, TF32 as torch reports it, compile,
    checkpointing); the same dict goes into efficiency.json."""
    tf32 = apply_tf32(cfg.train.tf32)
    t = cfg.train
    log.info(f"execution: precision {t.precision}; train.tf32={str(t.tf32).lower()} (float32 matmul precision "
             f"{tf32['float32_matmul_precision']!r}, cuDNN allow_tf32 {tf32['cudnn_allow_tf32']}); "
             f"train.compile={t.compile}; train.grad_checkpointing={str(t.grad_checkpointing).lower()}")
    return {"tf32": {"enabled": t.tf32, **tf32}, "compile": t.compile, "grad_checkpointing": t.grad_checkpointing}


def wrap_for_steps(cfg: Any, parts: Training, dist: DistInfo, device: torch.device) -> None:
    """How the steps execute: timm's gradient checkpointing, DDP under several processes, torch.compile
    (the DDP module for training, so that compilation sees its buckets; the plain model for evaluation)."""
    parts.model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    step_model = parts.model
    if dist.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            parts.model, device_ids=[device.index] if device.type == "cuda" else None)
    parts.step_model = compile_model(step_model, cfg.train.compile)
    parts.eval_model = compile_model(parts.model, cfg.train.compile)


def uses_cudagraphs(cfg: Any, device: torch.device) -> bool:
    return cfg.train.compile == "reduce-overhead" and device.type == "cuda"


def build_datasets(cfg: Any, dist: DistInfo) -> tuple[Any, Any]:
    """The training and evaluation splits, checked against each other and the batch size."""
    train_set = build_dataset(cfg.data, cfg.data.train_split, cfg.model.img_size, is_train=True)
    eval_set = build_dataset(cfg.data, cfg.data.eval_split, cfg.model.img_size, is_train=False)
    check_class_counts(train_set, eval_set)
    if cfg.train.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must divide among the "
                          f"{dist.world_size} processes (each takes batch / {dist.world_size})")
    if cfg.train.drop_last and cfg.train.batch_size > len(train_set):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the {len(train_set)} images of "
                          f"split {cfg.data.train_split!r}, and train.drop_last=true would drop them all")
    log.info(f"data: {train_set} / {eval_set}")
    return train_set, eval_set


def build_training(cfg: Any, model: nn.Module, train_set: Any, eval_set: Any, dist: DistInfo,
                   device: torch.device) -> Training:
    """Loaders, optimizer, schedule and (fp16) loss scaler for ``model``."""
    pin = device.type == "cuda"
    train_loader, sampler = build_train_loader(train_set, cfg.train.batch_size, dist, cfg.seed,
                                               cfg.data.num_workers, cfg.train.drop_last, pin)
    eval_loader = build_eval_loader(eval_set, cfg.train.eval_batch_size, dist, cfg.data.num_workers, pin)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    return Training(model, model, optimizer, scheduler, scaler, train_loader, sampler, eval_loader, model)


def open_board(cfg: Any, out: Path) -> TensorBoardLog | None:
    try:
        return TensorBoardLog(out) if cfg.log.tensorboard and is_main() else None
    except ImportError as e:
        raise ConfigError(str(e)) from None


def restore(ckpt: dict[str, Any], parts: Training, changes: list[str], out: Path, history: list[str]) -> Progress:
    """Weights, optimizer, schedule and scaler from a run checkpoint; with accepted config changes the
    new recipe's hyper-parameters and schedule apply to the old moments."""
    model, optimizer = parts.model, parts.optimizer
    ckpt["model"] = rename_earlier_keys(ckpt["model"])   # runs saved before PYRA's parameters were renamed
    missing = [k for k in trainable_state_dict(model) if k not in ckpt["model"]]
    if missing:
        raise CheckpointError(f"{out / 'last.pth'} lacks trainable parameters {missing[:5]} of this config")
    model.load_state_dict(ckpt["model"], strict=False)
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    if changes:
        for group, fresh in zip(optimizer.param_groups, configured):
            group.update(fresh)
    else:
        parts.scheduler.load_state_dict(ckpt["scheduler"])
    if parts.scaler is not None and ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    return Progress(ckpt["next_epoch"], EpochState(**ckpt.get("epoch_state", {})), ckpt["best"], history)


def restore_rng(saved: list[dict[str, Any]] | dict[str, Any], dist: DistInfo, device: torch.device,
                fresh_seed: int) -> None:
    """Each rank continues its own random stream. A checkpoint of another number of processes cannot say
    what this rank's stream was: every rank then starts a fresh one (``fresh_seed + rank``), with a warning."""
    states = saved if isinstance(saved, list) else [saved]   # older checkpoints: rank 0's state only
    if len(states) == dist.world_size:
        set_rng_state(states[dist.rank], device)
        return
    log.warning(f"the checkpoint holds the random streams of {len(states)} process(es), this run has "
                f"{dist.world_size}: each rank starts a fresh one (seed {fresh_seed} + rank); the data order "
                f"is the same, dropout and drop-path masks differ from an uninterrupted run")
    seed_everything(fresh_seed + dist.rank)


def train_epochs(cfg: Any, parts: Training, progress: Progress, files: RunFiles, stop: StopFlag,
                 n_parameters: int, device: torch.device) -> dict[str, Any] | None:
    """The remaining epochs, each checkpointed; returns the interruption if a signal stopped them."""
    out = files.out
    for epoch in range(progress.next_epoch, cfg.train.epochs):
        parts.scheduler.step(epoch)  # epoch e trains at lr(e)
        parts.sampler.set_position(epoch, progress.epoch_state.step)
        lr = parts.optimizer.param_groups[0]["lr"]
        state = train_one_epoch(parts.step_model, parts.train_loader, parts.optimizer, device, epoch,
                                progress.epoch_state, cfg.train.precision, parts.scaler, cfg.optim.clip_grad,
                                should_stop=stop, cudagraphs=uses_cudagraphs(cfg, device))
        if not state.finished:
            files.save(out / "last.pth", parts, progress, epoch, state)
            log.info(f"stopped by signal {stop.signal} at epoch {epoch}, step {state.step}; "
                     f"saved {out / 'last.pth'} — continue with --resume auto")
            return {"interrupted": True, "signal": stop.signal}
        record = end_of_epoch(cfg, parts, progress, epoch, lr, state, n_parameters, device)
        progress.next_epoch, progress.epoch_state = epoch + 1, EpochState()
        files.record_epoch(record)
        if record is not None and progress.best["epoch"] == epoch:   # best.pth first: if either write fails (a
            files.save(out / "best.pth", parts, progress, epoch + 1, progress.epoch_state)   # full disk), last.pth
        files.save(out / "last.pth", parts, progress, epoch + 1, progress.epoch_state)  # holds the epoch before
        if is_main():                                                                   # (trained again, exactly)
            write_learned_records(parts.model, out)
    return None


def end_of_epoch(cfg: Any, parts: Training, progress: Progress, epoch: int, lr: float, state: EpochState,
                 n_parameters: int, device: torch.device) -> dict[str, Any] | None:
    """The epoch's train loss over all ranks and, on evaluation epochs, the log.txt record (best updated)."""
    train_loss, train_samples = all_reduce_sum([state.loss_sum, state.samples], device)
    if not (epoch % cfg.train.eval_interval == 0 or epoch == cfg.train.epochs - 1):
        log.info(f"epoch {epoch}: lr {lr:.2e} train_loss {train_loss / train_samples:.4f} {state.seconds:.1f}s")
        return None
    stats = evaluate(parts.eval_model, parts.eval_loader, device, cfg.train.precision, uses_cudagraphs(cfg, device))
    best = progress.best
    if stats["acc1"] > best["acc1"]:
        best.update(acc1=stats["acc1"], epoch=epoch)
    record = {"train_lr": lr, "train_loss": train_loss / train_samples, "test_loss": stats["loss"],
              "test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "epoch": epoch,
              "n_parameters": n_parameters, "best_acc1": best["acc1"], "epoch_time": state.seconds}
    log.info(f"epoch {epoch}: lr {lr:.2e} train_loss {record['train_loss']:.4f} "
             f"test_loss {stats['loss']:.4f} acc1 {stats['acc1']:.2f} acc5 {stats['acc5']:.2f} "
             f"(best {best['acc1']:.2f} @ {best['epoch']}) {state.seconds:.1f}s")
    return record


def finish(cfg: Any, model: nn.Module, progress: Progress, out: Path, device: torch.device) -> dict[str, Any]:
    """final.json: best and last accuracy, the config and (opt-in) the merged-vs-unmerged speed-up."""
    best = progress.best
    last = json.loads((out / "log.txt").read_text().splitlines()[-1]) if is_main() else {}
    final = {"best_acc1": best["acc1"], "best_epoch": best["epoch"], "last_acc1": last.get("test_acc1"),
             "epochs": cfg.train.epochs, "finished": True, "config": config_to_dict(cfg)}
    speed = merged_speedup(model, cfg.report.benchmark_batch, cfg.model.img_size, device,
                           cfg.train.precision) if is_main() and cfg.report.speedup else None
    if speed is not None:
        final["merged_speedup"] = speed["speedup"]
        final["merged_speedup_spread"] = speed["spread"]
        final["merged_speedup_reliable"] = speed["spread"] <= UNRELIABLE_SPREAD
    if is_main():
        atomic_write(out / "final.json", lambda tmp: Path(tmp).write_text(json.dumps(final, indent=2)))
        log.info(f"final: top-1 {final['last_acc1']:.2f}% (best {best['acc1']:.2f}% at epoch {best['epoch']})"
                 + (f"; merged vs unmerged inference: {_speed_text(speed)}" if speed else ""))
    return final


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = args.config or str(DEMO_CONFIG)
        cfg = load_config(config, args.overrides)
        if args.config is None:
            ensure_demo_data(cfg)
        if args.nproc_per_node != 1:
            return launch(args, cfg)
        result = train(cfg, args.resume, args.overwrite, args.allow_config_change)
        if result.get("interrupted"):
            return 128 + result["signal"]  # 130 for Ctrl-C, 143 for SIGTERM: scripts can tell stopped from done
        return 0
    except DataError as e:
        _error(f"{e}{_demo_hint(args)}")
        return EXIT_CONFIG
    except (ConfigError, CheckpointError, RunFolderError) as e:
        _error(str(e))
        return EXIT_CONFIG
    except FileExistsError as e:
        _error(str(e))
        return EXIT_EXISTS
    except NonFiniteLossError as e:
        if is_main():
            log.error(str(e))
        _error(str(e))
        return EXIT_NONFINITE
    except DiskFullError as e:  # not logged: train.log may be what could not be written
        _error(f"{e}; free some space, then run the same command with --resume auto (it continues exactly from "
               f"the last checkpoint)")
        return EXIT_NO_SPACE
    except OSError as e:  # any other write of the run (its lock file, ...) that ran out of space
        if not is_disk_full(e):
            raise
        _error(f"no space left on device{f' writing {e.filename}' if e.filename else ''}; free some space, then "
               f"run the same command with --resume auto")
        return EXIT_NO_SPACE
    finally:
        cleanup()


def launch(args: argparse.Namespace, cfg: Any) -> int:
    """``--nproc-per-node N``: what every process would refuse is refused here, once, before any starts."""
    n = args.nproc_per_node
    if n < 1:
        raise ConfigError(f"--nproc-per-node must be a positive integer, got {n}")
    if launch_env(os.environ):
        raise ConfigError("--nproc-per-node starts processes itself; under torchrun or srun leave it out")
    if cfg.train.batch_size % n:
        raise ConfigError(f"--nproc-per-node {n} does not divide train.batch_size={cfg.train.batch_size} (the global "
                          f"batch; each of the {n} processes takes batch / {n})")
    rest = ["--config", args.config] if args.config else []          # the same run, less this flag
    rest += ["--resume", args.resume] if args.resume else []
    rest += ["--overwrite"] * args.overwrite + ["--allow-config-change"] * args.allow_config_change
    return launch_workers(n, str(Path(__file__).resolve()), rest + list(args.overrides))


def _error(text: str) -> None:
    """The error line on stderr, once: under torchrun / srun every process meets the same bad input, and
    only the first prints it. The others wait a moment before exiting, so that the launcher (which stops
    every process at the first exit) cannot stop the first before it has printed."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"error: {text}", file=sys.stderr)
    else:
        time.sleep(PEER_EXIT_DELAY_S)


def _demo_hint(args: argparse.Namespace) -> str:
    """The demo configs read data that ``python -m data.make_digits`` writes (unless data.root points elsewhere)."""
    demo_dir, own_root = DEMO_CONFIG.parent.resolve(), not any(o.startswith("data.root=") for o in args.overrides)
    if (args.config and Path(args.config).resolve().parent == demo_dir and own_root
            and not Path("data/demo/digits").is_dir()):
        return "\n(the demo data is written by: python -m data.make_digits)"
    return ""


def ensure_demo_data(cfg: Any) -> None:
    """The embedded default writes scikit-learn's digits in the VTAB-1k layout on first use."""
    from data.make_digits import write_digits

    write_digits(cfg.data.root, cfg.data.task)


if __name__ == "__main__":
    sys.exit(main())

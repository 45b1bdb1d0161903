"""The switches GPU users expect, on CPU: train.compile / train.tf32 / train.grad_checkpointing validated,
applied and recorded (train.py and eval.py), no host sync per training step, and persistent DataLoader
workers that keep a resumed epoch's random augmentations identical."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import eval as eval_script
import lib.engine
import models.vit
import train as train_script
from lib.config import ConfigError, load_config
from lib.distributed import DistInfo
from lib.engine import CHECK_EVERY, EpochState, train_one_epoch
from lib.loaders import build_train_loader
from lib.runs import config_changes
from models import create_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo/digits_random.yaml")
TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "merging.r=[4, 2]", "merging.pyra=true", "peft.dim=4", "data.num_workers=0", "train.batch_size=100",
        "train.eval_batch_size=400", "train.eval_interval=1", "report.benchmark_batch=4",
        "report.benchmark_seconds=0.01", "report.flops=false", "sched.warmup_epochs=0", "train.device=cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster than two fighting for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("override, message", [
    ("train.compile=fast", "train.compile: expected one of off, default, reduce-overhead, max-autotune; got 'fast'"),
    ("train.tf32=maybe", "train.tf32: expected bool, got 'maybe'"),
    ("train.grad_checkpointing=2", "train.grad_checkpointing: expected bool, got 2"),
])
def test_new_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_compile_and_checkpointing_are_neutral_on_resume_tf32_is_not():
    before = load_config(CONFIG, [])
    after = load_config(CONFIG, ["train.compile=reduce-overhead", "train.grad_checkpointing=true", "train.tf32=true"])
    from lib.config import config_to_dict
    changes = config_changes(config_to_dict(before), config_to_dict(after))
    assert [key for key, _, _ in changes] == ["train.tf32"]
    # a run made before a key existed has its default
    old = config_to_dict(before)
    del old["train"]["tf32"]
    from lib.config import DEFAULTS
    assert config_changes(old, config_to_dict(before), defaults=DEFAULTS) == []


@pytest.fixture
def tf32_restored():
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_switches_are_applied_and_recorded(digits_root, tmp_path, monkeypatch, tf32_restored):
    compiled, checkpointed = [], [0]
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compiled.append((type(model).__name__, mode))
                        or model)                           # what is compiled, and how (no inductor on 2 cores)
    real_checkpoint = models.vit.checkpoint

    def counting_checkpoint(*a, **kw):
        checkpointed[0] += 1
        return real_checkpoint(*a, **kw)

    monkeypatch.setattr(models.vit, "checkpoint", counting_checkpoint)
    switches = ["train.compile=reduce-overhead", "train.tf32=true", "train.grad_checkpointing=true"]
    out = tmp_path / "o"
    argv = ["--config", CONFIG, f"data.root={digits_root}", "data.task=digits", f"output_dir={out}",
            "experiment=s", *TINY, "train.epochs=1", *switches]
    assert train_script.main(argv) == 0
    run = out / "s" / "digits" / "seed0"
    assert compiled == [("MergingVisionTransformer", "reduce-overhead")] * 2   # training and evaluation
    assert checkpointed[0] == 10 * 2                         # 10 steps x 2 blocks, recomputed in backward
    log = (run / "train.log").read_text()
    assert ("execution: precision fp32; train.tf32=true (float32 matmul precision 'high', cuDNN allow_tf32 True); "
            "train.compile=reduce-overhead; train.grad_checkpointing=true") in log
    eff = json.loads((run / "efficiency.json").read_text())
    assert eff["tf32"] == {"enabled": True, "float32_matmul_precision": "high", "cudnn_allow_tf32": True}
    assert eff["compile"] == "reduce-overhead" and eff["grad_checkpointing"] is True
    saved = load_config(run / "config.yaml").train
    assert (saved.compile, saved.tf32, saved.grad_checkpointing) == ("reduce-overhead", True, True)
    # eval.py compiles its accuracy pass and applies TF32 from the same keys (its eager timing table is not
    # what this test is about: one stand-in row)
    compiled.clear()
    row = {"setting": "configured", "lora": "unfolded", "parameters": 1, "gflops": 0.0, "images_per_s": 1.0,
           "speedup": 1.0, "device": "cpu"}
    monkeypatch.setattr(eval_script, "efficiency_table", lambda *a, **k: [row])
    result_path = tmp_path / "eval.json"
    assert eval_script.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "last.pth"),
                             "--runs", "1", "--batch-size", "8", "--json", str(result_path),
                             "train.tf32=false", "train.compile=max-autotune"]) == 0
    result = json.loads(result_path.read_text())
    assert compiled == [("MergingVisionTransformer", "max-autotune")] and result["compile"] == "max-autotune"
    assert result["tf32"] == {"enabled": False, "float32_matmul_precision": "highest", "cudnn_allow_tf32": False}


def test_a_training_step_reads_nothing_from_the_device(monkeypatch):
    """Host reads (item / int / float / tolist of a tensor) happen at flag checks, not per step."""
    torch.manual_seed(0)
    model = create_model("vit", num_classes=3, embed_dim=16, depth=2, num_heads=2, patch_size=4, img_size=8,
                         merging=[2, 1], pyra=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps = 25
    data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])) for _ in range(steps)]
    reads = collections.Counter()
    for name in ("item", "__int__", "__float__", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            reads.update([_name]) or _real(self, *a, **k))
    state = train_one_epoch(model, data, optimizer, torch.device("cpu"), 0, EpochState(), clip_grad=1.0)
    monkeypatch.undo()
    checks = steps // CHECK_EVERY + 1                      # every CHECK_EVERY steps and at the end
    assert state.finished and state.step == steps
    assert sum(reads.values()) <= 2 * checks, reads        # the flag, the progress line's loss, the epoch's sum


class RandomImages(Dataset):
    """A random 'augmentation' per read: torch and Python RNGs, as timm's transforms use them."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i):
        import random
        return torch.rand(2) + random.random(), i


def test_persistent_workers_keep_a_resumed_epoch_identical():
    def batches(loader, sampler, epoch, start=0):
        sampler.set_position(epoch, start)
        return [x for x, _ in loader]

    loader, sampler = build_train_loader(RandomImages(), 4, DistInfo(), seed=1, num_workers=1, drop_last=False,
                                         pin_memory=False)
    assert loader.persistent_workers
    before = torch.get_rng_state()
    epochs = [batches(loader, sampler, 0), batches(loader, sampler, 1)]
    assert torch.equal(before, torch.get_rng_state())       # loading never draws from the process's stream
    assert not torch.equal(epochs[0][0], epochs[1][0])       # a new epoch, new augmentations
    fresh, fresh_sampler = build_train_loader(RandomImages(), 4, DistInfo(), seed=1, num_workers=0,
                                              drop_last=False, pin_memory=False)
    resumed = batches(fresh, fresh_sampler, 1, start=1)      # resumed at epoch 1, step 1, without workers
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, epochs[1][1:]))
    assert torch.equal(before, torch.get_rng_state())
    del loader


def test_non_finite_watch_keeps_the_first_bad_step():
    watch = lib.engine.NonFiniteWatch(torch.device("cpu"))
    for step, value in enumerate([1.0, float("inf"), float("nan")]):
        watch.record(torch.tensor(value), step)
    with pytest.raises(lib.engine.NonFiniteLossError, match="loss is inf at epoch 3, step 1;"):
        watch.check(3)

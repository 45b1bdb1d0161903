"""The paper's protocol: drop_last as the official loader, train.batch_size as the global batch (the same
steps and images for any number of processes), and the optional TensorBoard log."""
import builtins
import json
from pathlib import Path

import pytest
from test_run_record import CONFIG, TINY  # the tiny weight-free run of the run-record tests

import train as train_script
from lib.config import load_config
from lib.loaders import GlobalBatchSampler

REPO = Path(__file__).resolve().parents[1]


def test_vtab_recipe_drops_the_last_incomplete_batch():
    cfg = load_config(REPO / "configs/vit_b16/lora_pyra_high.yaml")
    assert cfg.train.drop_last is True and cfg.train.batch_size == 32
    sampler = GlobalBatchSampler(1000, cfg.train.batch_size, 1, 0, cfg.seed, cfg.train.drop_last)
    assert sampler.steps == 31 and len(sampler) == 31 * 32


@pytest.mark.parametrize("drop_last, n, batch", [(True, 1000, 32), (False, 1000, 32), (False, 97, 8), (False, 33, 32)])
@pytest.mark.parametrize("world", [2, 4])
def test_every_step_has_the_same_images_for_any_number_of_processes(drop_last, n, batch, world):
    single = GlobalBatchSampler(n, batch, 1, 0, seed=3, drop_last=drop_last)
    ranks = [GlobalBatchSampler(n, batch, world, r, seed=3, drop_last=drop_last) for r in range(world)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_position(epoch)
        steps = single.global_batches()
        assert single.steps == ranks[0].steps == len(steps) == (n // batch if drop_last else -(-n // batch))
        assert list(single) == [i for b in steps for i in b]
        streams, pos = [list(r) for r in ranks], [0] * world
        for k, images in enumerate(ranks[0].global_batches()):
            if len(steps[k]) >= world:
                assert images == steps[k], (epoch, k)           # the global batch of one process
            got = []
            for r in range(world):
                share = ranks[r]._share(images)
                if k < len(steps) - 1:
                    assert len(share) == batch // world              # full local batches: loader chunks align
                assert streams[r][pos[r]:pos[r] + len(share)] == share
                got += share
                pos[r] += len(share)
            assert got == images                                      # rank shares make up the step exactly
        assert pos == [len(s) for s in streams]


def test_resume_position_skips_whole_global_steps():
    full = GlobalBatchSampler(100, 20, 2, 1, seed=0, drop_last=True)
    later = GlobalBatchSampler(100, 20, 2, 1, seed=0, drop_last=True)
    full.set_position(4)
    later.set_position(4, start_step=2)
    assert list(later) == list(full)[2 * 10:]


def test_global_batch_must_divide_among_processes():
    with pytest.raises(ValueError, match="does not divide among 3 processes"):
        GlobalBatchSampler(100, 32, 3, 0, seed=0, drop_last=True)


@pytest.fixture
def root(digits_root):
    return digits_root   # the shared read-only digits (conftest)


def run_args(root, out, *extra):
    return ["--config", CONFIG, f"data.root={root}", "data.task=digits", f"output_dir={out}", "experiment=p",
            *TINY, *extra]


def test_tensorboard_log_has_the_epoch_scalars(root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train_script.main(run_args(root, tmp_path, "train.epochs=2", "log.tensorboard=true")) == 0
    run = tmp_path / "p" / "digits" / "seed0"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    for key in ("train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [0, 1]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6)


def test_tensorboard_missing_is_a_clear_error(root, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert train_script.main(run_args(root, tmp_path, "train.epochs=1", "log.tensorboard=true")) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()

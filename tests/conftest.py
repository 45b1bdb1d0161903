"""Shared test fixtures."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ---------------------------------------------------------------------------------------------------
# Data fixtures: small VTAB-1k task folders written with PIL (independent of data/build_vtab.py).

def write_vtab_task(root: Path, task: str = "cifar", sizes: dict[str, int] | None = None, test_size: int = 4,
                    num_classes: int = 10, image_size: int = 4, seed: int = 0) -> Path:
    """Write ``root/task`` in the VTAB-1k layout with distinct random PNGs; labels cycle over the classes.

    ``sizes`` gives train800/val200 counts (default 800/200); train800val200 is their concatenation.
    """
    sizes = sizes or {"train800": 800, "val200": 200}
    rng = np.random.default_rng(seed)
    task_dir = Path(root) / task
    lists: dict[str, list] = {}
    for split, count in (("train800", sizes["train800"]), ("val200", sizes["val200"]), ("test", test_size)):
        (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            rel = f"images/{split}/{i:06d}.png"
            pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(task_dir / rel)
            lines.append(f"{rel} {i % num_classes}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (task_dir / f"{split}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return task_dir


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn's digits in the VTAB-1k layout (``data.make_digits``), written once per session; tests
    that change the files write their own copy."""
    from data.make_digits import write_digits

    root = tmp_path_factory.mktemp("digits_data")
    write_digits(root, "digits")
    return root


@pytest.fixture
def train_demo_epoch(digits_root, tmp_path) -> Callable[[str], Path]:
    """Train a tiny custom ViT (16 px, patch 4, width 32, 2 blocks) on the digits for one epoch through
    ``train.main``, the demo config plus a YAML ``merging:`` section; checks that one epoch logged a finite loss
    and returns the run folder."""
    import json

    import torch

    import train as train_script

    repo = Path(__file__).resolve().parents[1]

    def run(merging_yaml: str) -> Path:
        config = tmp_path / "method.yaml"
        config.write_text(f"_base_: [{repo / 'configs/demo/digits_random.yaml'}]\n{merging_yaml}")
        args = ["--config", str(config), f"data.root={digits_root}", "data.task=digits", f"output_dir={tmp_path}",
                "experiment=t", "model.name=vit", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
                "model.depth=2", "model.num_heads=2", "data.num_workers=0", "train.batch_size=20",
                "train.epochs=1", "train.eval_interval=1", "sched.warmup_epochs=0",
                "report.benchmark_batch=8", "report.benchmark_seconds=0.05"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)          # a tiny model: one thread is fastest, and the cores are shared
        try:
            assert train_script.main(args) == 0
        finally:
            torch.set_num_threads(threads)
        folder = tmp_path / "t" / "digits" / "seed0"
        rows = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["train_loss"] == rows[0]["train_loss"]   # one epoch, a finite loss
        return folder

    return run


@pytest.fixture
def compiles_and_exports() -> Callable[..., None]:
    """Check that an eval model goes through ``torch.compile`` in one graph (``fullgraph``; ``backend``: "eager"
    is dynamo's capture alone, "aot_eager" adds AOT autograd, neither builds C++) and ``torch.export``, both
    giving the eager output."""
    import torch

    def check(model, x, backend: str = "eager") -> None:
        with torch.no_grad():
            eager = model(x)
            torch.testing.assert_close(torch.compile(model, backend=backend, fullgraph=True)(x), eager)
            program = torch.export.export(model, (x,))
            torch.testing.assert_close(program.module()(x), eager, rtol=1e-6, atol=1e-6)

    return check


@pytest.fixture
def make_vtab_task() -> Callable[..., Path]:
    """Factory fixture around :func:`write_vtab_task`."""
    return write_vtab_task

"""The documents work: every Python block of README.md and models/README.md runs, and README's first screen holds
what a new user needs (what PYRA is, where the paper and the official code are, a picture, the two commands CI
runs, an example)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

from models.backbones import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
FIRST_SCREEN = 40


def _generated_checkpoint(name: str, folder: Path) -> Path:
    """A random checkpoint of the backbone whose file ``weight/<name>`` is not here, in timm's ``.pth`` layout
    (what ``models.load_checkpoint`` reads for DeiT/MAE files), with the architecture from the backbone table."""
    spec = next((s for s in BACKBONES.values() if s.checkpoint == name), None)
    assert spec is not None, f"weight/{name}: no backbone in models.backbones.BACKBONES uses this file"
    with torch.device("meta"):
        shapes = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs).state_dict()
    generator = torch.Generator().manual_seed(0)
    path = folder / f"{Path(name).stem}.pth"
    torch.save({"model": {k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in shapes.items()}}, path)
    return path


def _runnable(block: str, folder: Path) -> str:
    """The block with every missing ``weight/...`` file replaced by a generated checkpoint."""
    for name in sorted(set(re.findall(r"weight/([\w.\-]+)", block))):
        if not (ROOT / "weight" / name).is_file():
            block = block.replace(f"weight/{name}", str(_generated_checkpoint(name, folder)))
    return block


@pytest.mark.parametrize("doc", ["README.md", "models/README.md"])
def test_every_python_block_runs(doc, tmp_path, monkeypatch):
    """In order, in one namespace per document (a block may use what an earlier one defined), from the root."""
    blocks = PYTHON_BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))
    assert blocks, doc
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__main__"}
    for i, block in enumerate(blocks):
        exec(compile(_runnable(block, tmp_path), f"{doc}, Python block {i + 1}", "exec"), namespace)


def test_missing_weights_are_replaced_only_when_missing(tmp_path):
    block = 'load("weight/ViT-S_16.npz"); load("weight/demo_vit_p4_32.pth")'
    out = _runnable(block, tmp_path)
    assert "weight/ViT-S_16.npz" not in out and "weight/demo_vit_p4_32.pth" in out
    assert (tmp_path / "ViT-S_16.pth").is_file()


def _ci_test_command() -> str:
    lines = [line.split("||")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.startswith("python -m pytest")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_first_screen():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 300
    screen = "\n".join(lines[:FIRST_SCREEN])
    assert "https://arxiv.org/abs/2403.09192" in screen and "https://github.com/THU-MIG/PYRA" in screen
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", screen)
    assert len(pictures) == 1
    picture = ROOT / pictures[0]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size < 100_000
    commands = re.search(r"```bash\n(.*?)```", screen, re.DOTALL).group(1).splitlines()
    assert [c.split("#")[0].strip() for c in commands] == ["pip install -r requirements.txt && python train.py",
                                                           _ci_test_command()]
    example = PYTHON_BLOCK.search(screen)
    assert example is not None and len(example.group(1).splitlines()) <= 10


def test_readme_sections_links_and_no_speed_records():
    text = README.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    for wanted in ("VTAB-1k", "Configs", "Outputs and reliability", "Differences from the official implementation",
                   "Citation"):
        assert wanted in headings, wanted
    for link in re.findall(r"\]\(([\w/.\-]+\.md)(?:#[\w-]+)?\)", text):
        assert (ROOT / link).is_file(), link
    for doc in ("models/README.md", "scripts/speed_records/README.md", "data/README.md", "weight/README.md"):
        assert f"({doc})" in text, doc
    assert "speed:" not in text and "images/s (model)" not in text   # speed records live beside the harness
    differences = text.split("## Differences from the official implementation")[1].split("\n## ")[0]
    assert len(re.findall(r"^\d+\. \*\*", differences, re.MULTILINE)) >= 15

"""scripts/visualize_merging.py: label maps from source maps, rendering, and the CLI on a tiny ViT."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scripts_visualize_merging", ROOT / "scripts" / "visualize_merging.py")
vm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vm)

TINY = """\
model:
  name: vit
  pretrained: ""
  img_size: 32
  patch_size: 4
  embed_dim: 48
  depth: 4
  num_heads: 3
merging:
  r: {r}
  pyra: true
data:
  task: dtd
  num_workers: 0
"""


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(r="[8, 8, 8, 8]"))
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    a = np.zeros((40, 48, 3), np.uint8)
    a[:20, :, 0] = 255
    a[20:, :, 2] = 200
    a[10:30, 12:36, 1] = 255
    path = tmp_path / "img.png"
    Image.fromarray(a).save(path)
    return path


def test_source_to_labels_groups_patches_by_owner() -> None:
    # cls token + 4 patches (2×2); token 1 holds patches 0 and 3, token 2 holds patches 1 and 2.
    source = torch.tensor([[1, 0, 0, 0, 0],
                           [0, 1, 0, 0, 1],
                           [0, 0, 1, 1, 0]], dtype=torch.float32)
    labels = vm.source_to_labels(source, (2, 2), num_prefix=1)
    assert labels.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="exactly one token"):
        vm.source_to_labels(torch.zeros(3, 5), (2, 2), num_prefix=1)


def test_render_groups_fills_mean_colour_and_outlines() -> None:
    image = np.zeros((8, 8, 3), np.float32)
    image[:, :4, 0] = 1.0            # left half red
    image[:4, 4:, 2] = 1.0           # top right blue, bottom right black
    labels = np.array([[0, 1], [0, 1]])
    out = vm.render_groups(image, labels, fill="mean")
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out[3, 1], [1.0, 0.0, 0.0])        # interior of group 0: its mean (red)
    np.testing.assert_allclose(out[3, 6], [0.0, 0.0, 0.5])        # group 1: half blue, half black
    assert not np.allclose(out[0, 0], [1.0, 0.0, 0.0])            # the border is outlined
    random = vm.render_groups(image, labels, fill="random", seed=1)
    np.testing.assert_allclose(random[0, 0], 0.0)                  # black outline
    assert not np.allclose(random[3, 1], random[3, 6])             # the two groups differ
    with pytest.raises(ValueError):
        vm.render_groups(image, np.zeros((3, 3), int))


def test_default_layers() -> None:
    assert vm.default_layers(12) == [3, 6, 11]
    assert vm.default_layers(4) == [1, 2, 3]
    assert vm.default_layers(1) == [0]


def test_cli_writes_png_with_token_counts(tiny_config: Path, image: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "vis" / "merge.png"
    assert vm.main(["--image", str(image), "--config", str(tiny_config), "--layers", "0", "3",
                    "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # 64 patches + cls: 65 -> 57 after block 0, 8 fewer per block -> 33 after block 3.
    assert "after block 0: 57 tokens, 56 patch groups" in printed
    assert "after block 3: 33 tokens, 32 patch groups" in printed
    # Overrides, also after --layers (whose nargs must not swallow them).
    assert vm.main(["--image", str(image), "--config", str(tiny_config), "--out", str(out), "--layers", "0", "3",
                    "merging.r=[4,4,4,4]", "model.drop_path_rate=0.0"]) == 0
    printed = capsys.readouterr().out
    assert "after block 0: 61 tokens, 60 patch groups" in printed
    assert "after block 3: 49 tokens, 48 patch groups" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()


def test_visualize_identity_before_merging_and_checkpoint(tmp_path: Path, image: Path) -> None:
    from lib.config import load_config

    path = tmp_path / "late.yaml"
    path.write_text(TINY.format(r="[0, 8, 8, 8]"))
    cfg = load_config(path)
    # A fine-tuned checkpoint with another class count than the config's task: its head decides.
    model, _ = vm.load_model(cfg, pretrained=False)
    ckpt = tmp_path / "ft.pth"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state.update({"head.weight": torch.randn(7, 48), "head.bias": torch.zeros(7)})
    torch.save({"model": state}, ckpt)
    result = vm.visualize(str(image), cfg, layers=[0, 1], out=str(tmp_path / "m.png"), checkpoint=str(ckpt))
    assert result["layers"][0]["tokens"] == 65 and result["layers"][0]["groups"] == 64
    assert result["layers"][1]["tokens"] == 57
    assert any("loaded" in r for r in result["reports"])
    assert (tmp_path / "m.png").is_file()


def test_cli_reports_bad_input(tiny_config: Path, image: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.png")
    assert vm.main(["--image", str(image), "--config", str(tiny_config), "--layers", "4", "--out", out]) == 2
    assert vm.main(["--image", str(tmp_path / "none.png"), "--config", str(tiny_config), "--out", out]) == 2
    missing_weights = "model.pretrained=nope.npz"
    assert vm.main(["--image", str(image), "--config", str(tiny_config), "--out", out, missing_weights]) == 2


def test_visualize_with_prompts_skips_their_columns(tiny_config: Path, image: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.png"
    assert vm.main(["--image", str(image), "--config", str(tiny_config), "--out", str(out), "--layers", "0", "3",
                    "peft.type=prompt", "peft.dim=5", "peft.prompt_mode=deep", "merging.r=[4,4,4,4]"]) == 0
    printed = capsys.readouterr().out
    # 1 class token + 5 prompts + 64 patches; the prompts stand for no patch and are never merged.
    assert "after block 0: 66 tokens, 60 patch groups" in printed
    assert "after block 3: 54 tokens, 48 patch groups" in printed

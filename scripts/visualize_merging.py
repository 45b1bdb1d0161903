#!/usr/bin/env python
"""Show which image patches each token stands for after token merging (ToMe's ``make_visualization``).

Usage::

    python scripts/visualize_merging.py --image IMG --config CFG [--checkpoint PTH] [--layers 3 6 11]
        [--out merge.png] [--fill mean|random] [--seed 0] [--no-pretrained] [dotted.key=value ...]

The model is built from the config exactly as for training (backbone, PEFT, merging schedule, PYRA),
with source tracking on; ``model.pretrained`` and then ``--checkpoint`` are loaded. Layers are 0-based
block indices; each panel shows the token groups after that block: every group filled with its mean
colour (or a random one) and outlined, so the effect of the merging schedule (and of fine-tuning, which
changes the keys the matching uses) can be seen on a real image.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # dotted.key=value

__all__ = ["load_model", "default_layers", "collect_sources", "source_to_labels", "render_groups",
           "visualize", "main"]


def _checkpoint_classes(path: str) -> int | None:
    """Rows of the head in a checkpoint (so a fine-tuned head loads whatever the config says), if any."""
    from models import read_checkpoint

    if path.endswith(".npz"):
        return None
    ckpt = read_checkpoint(path)
    for container in (ckpt, *(v for v in ckpt.values() if isinstance(v, dict))):
        for key, value in container.items():
            if key.removeprefix("module.") == "head.weight" and hasattr(value, "shape") and len(value.shape) == 2:
                return int(value.shape[0])
    return None


def load_model(cfg: Any, checkpoint: str | None = None, pretrained: bool = True) -> tuple[Any, list[str]]:
    """The config's model from ``lib.build.build_model`` (which loads and logs ``model.pretrained`` unless
    ``pretrained`` is False), with ``checkpoint`` loaded on top, source tracking on, in eval mode; and the
    checkpoint's load report (``loaded ... missing ...``)."""
    from lib.build import build_model
    from lib.data import task_num_classes
    from models import load_checkpoint

    num_classes = cfg.data.num_classes or task_num_classes(cfg.data.task, cfg.data.root)
    if checkpoint:
        num_classes = _checkpoint_classes(checkpoint) or num_classes
    # The head plays no part in the merging, so an unknown class count is harmless.
    model = build_model(cfg, num_classes or 1000, pretrained=pretrained)
    model.trace_source = True
    reports = [load_checkpoint(model, checkpoint).summary()] if checkpoint else []
    return model.eval(), reports


def default_layers(depth: int) -> list[int]:
    """A quarter, half way and the last block (3, 6, 11 for 12 blocks)."""
    return sorted({max(0, depth // 4), depth // 2, depth - 1})


def collect_sources(model: Any, x: Any, layers: Sequence[int]) -> dict[int, Any]:
    """Run ``x`` (1×3×H×W) and return the source map (N×N₀) after each block in ``layers``.

    A block before any merging returns no source map: it is then the identity (each token itself).
    """
    import torch

    sources: dict[int, Any] = {}
    handles = []
    for i in layers:
        def hook(module, inputs, output, i=i):
            x_out, _, source = output
            n = x_out.shape[1]
            sources[i] = source[0].detach().cpu() if source is not None else torch.eye(n)
        handles.append(model.blocks[i].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sources


def source_to_labels(source: Any, grid: tuple[int, int], num_prefix: int) -> np.ndarray:
    """The gh×gw map of which token each patch belongs to (tokens numbered 0.. in order of appearance)."""
    patches = np.asarray(source, dtype=np.float32)[:, num_prefix:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"source map has {patches.shape[1]} patch columns, expected {grid[0]}×{grid[1]}")
    owner = patches.argmax(axis=0)
    if not np.allclose(patches.sum(axis=0), 1.0):
        raise ValueError("source map: every patch must belong to exactly one token")
    _, labels = np.unique(owner, return_inverse=True)
    return labels.reshape(grid)


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels on a group's border: a 4-neighbour in another group, or the image border (as ToMe's erosion)."""
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(2, 1)
    edge = (ndimage.grey_dilation(labels, footprint=cross, mode="nearest") != labels)
    edge |= (ndimage.grey_erosion(labels, footprint=cross, mode="nearest") != labels)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    return edge


def render_groups(image: np.ndarray, labels: np.ndarray, fill: str = "mean", seed: int = 0) -> np.ndarray:
    """An H×W×3 float image: each group filled (its mean colour or a random one) with an outline.

    ``image`` is H×W×3 in [0, 1] with H, W multiples of the label grid. As in ToMe, a mean-coloured group
    gets a random outline colour; a randomly coloured group a black one.
    """
    if fill not in ("mean", "random"):
        raise ValueError(f"fill must be 'mean' or 'random', got {fill!r}")
    h, w = image.shape[:2]
    gh, gw = labels.shape
    if h % gh or w % gw:
        raise ValueError(f"image {h}×{w} is not a multiple of the {gh}×{gw} patch grid")
    pixels = np.kron(labels, np.ones((h // gh, w // gw), dtype=labels.dtype))
    n = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    random_colors = rng.uniform(0.15, 1.0, size=(n, 3))
    if fill == "mean":
        counts = np.bincount(pixels.ravel(), minlength=n)[:, None]
        sums = np.stack([np.bincount(pixels.ravel(), weights=image[..., c].ravel(), minlength=n)
                         for c in range(3)], axis=1)
        colors, edge_colors = sums / np.maximum(counts, 1), random_colors
    else:
        colors, edge_colors = random_colors, np.zeros((n, 3))
    out = colors[pixels]
    edge = _edges(pixels)
    out[edge] = edge_colors[pixels[edge]]
    return out


def _load_image(path: str, img_size: int, normalization: str) -> tuple[Any, np.ndarray]:
    """(model input 1×3×S×S through the config's transform, the resized image as S×S×3 in [0, 1])."""
    from PIL import Image

    from lib.data import build_transform

    with Image.open(path) as img:
        img = img.convert("RGB")
    x = build_transform(img_size, normalization)(img).unsqueeze(0)
    shown = np.asarray(img.resize((img_size, img_size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return x, shown


def visualize(image: str, cfg: Any, layers: Sequence[int] | None = None, out: str = "merge.png",
              checkpoint: str | None = None, fill: str = "mean", seed: int = 0,
              pretrained: bool = True) -> dict[str, Any]:
    """Build, run and draw; returns per-layer token counts, group label maps and the checkpoint's load report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, reports = load_model(cfg, checkpoint, pretrained)
    depth = len(model.blocks)
    layers = list(default_layers(depth) if not layers else layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"--layers {bad}: blocks are numbered 0..{depth - 1}")
    x, shown = _load_image(image, cfg.model.img_size, cfg.data.normalization)
    sources = collect_sources(model, x, layers)
    grid = tuple(model.patch_embed.grid_size)
    scale = max(1, math.ceil(256 / cfg.model.img_size))  # small inputs are enlarged so outlines show
    big = np.kron(shown, np.ones((scale, scale, 1), dtype=np.float32))

    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3 * (len(layers) + 1), 3.4), squeeze=False)
    axes[0, 0].imshow(big)
    axes[0, 0].set_title("input", fontsize=9)
    result: dict[str, Any] = {"layers": {}, "reports": reports, "r": list(model.r), "out": out}
    for ax, i in zip(axes[0, 1:], layers):
        # Class / distillation tokens and visual prompts come first and stand for no patch.
        labels = source_to_labels(sources[i], grid, model.num_prefix_tokens + model.num_prompt_tokens)
        ax.imshow(np.clip(render_groups(big, labels, fill, seed), 0, 1))
        n_tokens = sources[i].shape[0]
        ax.set_title(f"after block {i}: {n_tokens} tokens", fontsize=9)
        result["layers"][i] = {"tokens": n_tokens, "groups": int(labels.max()) + 1, "labels": labels}
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{Path(image).name} — {cfg.experiment}, r = {list(model.r)}", fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="input image (any format PIL reads)")
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/vit_b16/lora_pyra_high.yaml)")
    parser.add_argument("--checkpoint", help="fine-tuned checkpoint (best.pth / last.pth of a run)")
    parser.add_argument("--layers", type=int, nargs="+", help="0-based blocks to show (default: 1/4, 1/2, last)")
    parser.add_argument("--out", default="merge.png", help="output PNG (default: merge.png)")
    parser.add_argument("--fill", choices=("mean", "random"), default="mean", help="group colour")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random colours")
    parser.add_argument("--no-pretrained", action="store_true", help="do not load model.pretrained")
    parser.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    # Overrides may follow --layers (whose nargs would swallow them): take them out first.
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not _OVERRIDE.match(a)])
    args.overrides += overrides

    from lib.config import ConfigError, load_config
    from lib.logger import setup_logger

    setup_logger(None)   # lib.build's lines: the pretrained weights' load report, clamped schedules
    try:
        cfg = load_config(args.config, args.overrides)
        result = visualize(args.image, cfg, args.layers, args.out, args.checkpoint, args.fill, args.seed,
                           pretrained=not args.no_pretrained)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for report in result["reports"]:
        print(report)
    if not any(result["r"]):
        print("note: merging.r is empty for this config: no token is merged", file=sys.stderr)
    for i, info in result["layers"].items():
        print(f"after block {i}: {info['tokens']} tokens, {info['groups']} patch groups")
    print(f"wrote {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

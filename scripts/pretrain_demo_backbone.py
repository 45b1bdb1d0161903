#!/usr/bin/env python
"""Pretrain the demo's small ViT on printed letters (``data/make_glyphs.py``), offline and deterministically.

    python scripts/pretrain_demo_backbone.py                      # -> weight/demo_vit_p4_32.pth (the shipped file)
    python scripts/pretrain_demo_backbone.py --steps 5 --depth 1 --embed-dim 32 --num-heads 2 --out /tmp/t.pth

The backbone is timm's ``VisionTransformer`` as the demo's custom ``vit`` builds it (32x32 input, 4x4 patches ->
class token + 64 tokens, average pooling), trained from scratch, every parameter, on an endless stream of generated
letter images (40 classes, no digits) with AdamW, a linear warm-up and a cosine decay. The loss is the letter
cross-entropy plus an auxiliary one (``--recon-weight``): a linear decoder, discarded afterwards, must rebuild
the image's 8x8 ink map from the pooled feature. Classification alone squeezes the pooled feature down to what
tells letters apart, and a frozen backbone trained that way tops out near 80 % on the digits whatever its
letter accuracy; with the reconstruction term the feature keeps the whole image, the letters are learnt in a
fraction of the steps, and the frozen backbone transfers (README's demo numbers). The stream, the
initialisation and the evaluation batch all come from fixed seeds, and the thread count is fixed, so a
rerun on the same machine and library versions writes the same bytes.

The file is a DeiT-style ``.pth`` (``{"model": state_dict, "meta": {...}}``, float32 tensors), the path a
user's pretrained checkpoint takes: ``models.load_checkpoint`` drops its 40-class head (``kind="pretrained"``)
and loads the rest. ``meta`` records the architecture, the recipe and the source-task top-1 on a fixed
generated batch (``--eval-size`` images from ``--eval-seed``), which ``tests/test_demo_backbone.py`` checks.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU spinning threads slow every step several
# times over (measured 1.3 s vs 5-12 s per step here). Set before torch loads OpenMP; results are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from data.make_glyphs import BLOCK, FONT_FILES, GLYPHS, IMAGE_SIZE, make_batch, normalize  # noqa: E402
from lib.checkpointing import atomic_write  # noqa: E402

DEFAULT_OUT = ROOT / "weight" / "demo_vit_p4_32.pth"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint to write (default: %(default)s)")
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--global-pool", default="avg", choices=("avg", "token"))
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--recon-weight", type=float, default=1.0,
                   help="weight of the auxiliary loss: reconstruct the 8x8 ink map linearly from the pooled feature")
    p.add_argument("--seed", type=int, default=0, help="initialisation and training stream")
    p.add_argument("--eval-seed", type=int, default=1, help="the fixed evaluation batch (disjoint stream)")
    p.add_argument("--eval-size", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed: results depend on it)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=0, help="also write <out>.step<N> every N steps (0: never)")
    p.add_argument("--save-dtype", default="float32", choices=("float32", "float16"),
                   help="tensor type in the file; float16 halves it (the weights are rounded before the final "
                        "evaluation, so the recorded top-1 is the file's)")
    return p.parse_args(argv)


def sincos_pos_embed(dim: int, grid: int, prefix: int) -> torch.Tensor:
    """``1 x (prefix + grid²) x dim`` 2-D sine-cosine position embedding (MAE's), zeros for the prefix tokens."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, 1)
    table = torch.cat([table, torch.zeros(grid * grid, dim - table.shape[1], dtype=torch.float64)], 1)
    return torch.cat([torch.zeros(prefix, dim, dtype=torch.float64), table]).unsqueeze(0).float()


def build(arch: dict[str, Any]) -> nn.Module:
    """timm's plain ``VisionTransformer`` (what ``models.create_model("vit", ...)`` patches) with a 40-class
    head, every parameter trainable (seeded by the caller): the file does not depend on this project's model code.

    The position embedding starts as a 2-D sine-cosine table (then trains): each demo token carries a
    single grey value, so the blocks need to tell positions apart from the first step."""
    model = VisionTransformer(num_classes=len(GLYPHS), drop_path_rate=0.0, **arch)
    grid = arch["img_size"] // arch["patch_size"]
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(arch["embed_dim"], grid, model.num_prefix_tokens))
    return model


@torch.no_grad()
def source_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 (%) of ``model`` on uint8 glyph images, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(normalize(images[start:start + batch_size]))
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(labels)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``lr``, then cosine to ``min_lr`` at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * progress))


def checkpoint_bytes(model: nn.Module, meta: dict[str, Any], dtype: torch.dtype = torch.float32) -> bytes:
    """``torch.save`` of ``{"model", "meta"}`` (tensors as ``dtype``) into memory: the bytes depend on the
    content only (the archive's inner name would otherwise follow the file name)."""
    state = {k: v.detach().to(dtype).clone().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"model": state, "meta": meta}, buffer)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through the project's atomic write: a killed run leaves no truncated checkpoint."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    arch = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads,
            "patch_size": args.patch_size, "img_size": args.img_size, "global_pool": args.global_pool}
    torch.manual_seed(args.seed)
    model = build(arch)
    n_params = sum(p.numel() for p in model.parameters())
    decayed = {n: p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decayed[n]]
    no_decay = [p for n, p in model.named_parameters() if not decayed[n]]
    # The auxiliary decoder (not saved): the pooled feature must keep the whole image linearly, not only
    # what separates letters, which is what a frozen backbone's head needs on a new task.
    decoder = nn.Linear(args.embed_dim, (IMAGE_SIZE // BLOCK) ** 2)
    optimizer = torch.optim.AdamW([{"params": decay + [decoder.weight], "weight_decay": args.weight_decay},
                                   {"params": no_decay + [decoder.bias], "weight_decay": 0.0}], lr=args.lr)
    eval_images, eval_labels = make_batch(args.eval_size, seed=args.eval_seed)
    stream = torch.Generator().manual_seed(args.seed + 10_000)  # training images, disjoint from eval
    print(f"[pretrain] vit {arch}, {n_params:,} parameters, {len(GLYPHS)} glyph classes x {len(FONT_FILES)} fonts; "
          f"{args.steps} steps x batch {args.batch_size}, {args.threads} threads", flush=True)

    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        images, labels = make_batch(args.batch_size, generator=stream)
        pooled = model.forward_head(model.forward_features(normalize(images)), pre_logits=True)
        loss = F.cross_entropy(model.head(pooled), labels, label_smoothing=args.label_smoothing)
        if args.recon_weight:
            ink = images[:, ::BLOCK, ::BLOCK].flatten(1).float() / 255.0   # the 8x8 map (blocks are constant)
            loss = loss + args.recon_weight * F.mse_loss(decoder(pooled), ink, reduction="sum") / len(ink)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            nn.utils.clip_grad_norm_([*model.parameters(), *decoder.parameters()], args.clip_grad)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss at step {step}")
        loss_sum, seen = loss_sum + loss.item(), seen + 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"[pretrain] step {step + 1}/{args.steps} lr {lr_at(step, args):.2e} loss {loss_sum / seen:.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
            loss_sum, seen = 0.0, 0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            write_atomic(Path(f"{args.out}.step{step + 1}"),
                         checkpoint_bytes(model, {"format": "demo-backbone", "arch": arch, "step": step + 1}))

    dtype = getattr(torch, args.save_dtype)
    if dtype != torch.float32:
        with torch.no_grad():                           # evaluate the weights the file will hold
            for tensor in model.state_dict().values():
                tensor.copy_(tensor.to(dtype))
    top1 = source_accuracy(model, eval_images, eval_labels)
    seconds = time.perf_counter() - start
    recipe = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay",
                                            "label_smoothing", "clip_grad", "recon_weight", "seed", "threads")}
    if dtype != torch.float32:
        recipe["save_dtype"] = args.save_dtype
    meta = {"format": "demo-backbone", "arch": arch, "classes": GLYPHS, "fonts": list(FONT_FILES),
            "recipe": recipe, "source_eval": {"seed": args.eval_seed, "size": args.eval_size, "top1": top1},
            "torch": torch.__version__.split("+")[0]}
    data = checkpoint_bytes(model, meta, dtype)
    out = Path(args.out)
    write_atomic(out, data)
    import hashlib

    print(f"[pretrain] source-task top-1 {top1:.2f}% on {args.eval_size} generated letters (seed {args.eval_seed}); "
          f"{seconds:.0f}s", flush=True)
    print(f"[pretrain] wrote {out} ({len(data) / 2**20:.2f} MiB) sha256 {hashlib.sha256(data).hexdigest()}")
    print(json.dumps(meta["source_eval"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write the PiToMe golden tensors by running the OFFICIAL code (github.com/hchautran/PiToMe) on small fixed inputs.

    python tests/data/golden/pitome/make_golden.py <official checkout> [<output dir>]

The checkout's files are imported as they are (``algo/pitome/merge.py``, ``algo/pitome/patch/timm.py`` and
``algo/pitome/patch/deit.py``); nothing of them is copied here. Only the package ``__init__`` files are
skipped (empty stand-ins are registered for ``algo``, ``algo.pitome`` and ``algo.pitome.patch``), because they
import the BLIP / CLIP / BERT patches and with them LAVIS and transformers, which image classification does not
use. This script builds inputs, calls the official functions and saves what they return (README.md beside it:
the commit and the environment). Two kinds of files:

- ``step_*.pt``: one reduction step — ``pitome_vision`` (class token first) on a key metric, then the official
  ``merge_wavg`` on tokens with sizes and (in two of the three) ``merge_source`` on a 0/1 source map; the merged
  tokens, sizes and sources, and the gradient of a fixed linear function of the merged tokens and sizes with
  respect to the input tokens (the step runs unchanged in training: the matching is under ``no_grad``, the merge
  is differentiable).
- ``vit.pt``: a tiny timm ViT patched by the official DeiT/ViT ``apply_patch`` with a keep ratio: its weights,
  eval logits, and train-mode logits and gradients (dropout and drop-path at 0).
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch


def official_modules(checkout: Path):
    """The official ``merge`` and ``patch.deit`` modules, imported from the checkout without the package inits."""
    for name, folder in (("algo", "algo"), ("algo.pitome", "algo/pitome"), ("algo.pitome.patch", "algo/pitome/patch")):
        package = types.ModuleType(name)
        package.__path__ = [str(checkout / folder)]
        sys.modules[name] = package
    return importlib.import_module("algo.pitome.merge"), importlib.import_module("algo.pitome.patch.deit")


def step_case(merge, *, batch: int, patches: int, channels: int, in_dim: int, ratio: float, margin: float,
              alpha: float, bipartite: bool, seed: int, with_source: bool = True) -> dict:
    torch.manual_seed(seed)
    n = patches + 1                                        # class token first, as the official ViT has it
    x = torch.randn(batch, n, channels)
    metric = torch.randn(batch, n, in_dim)
    size = torch.randint(1, 4, (batch, n, 1)).float()
    size[:, 0] = 1.0                                       # the class token never merges
    source = (torch.rand(batch, n, 2 * n) < 0.2).float() if with_source else None
    r = int(patches - patches * ratio)
    proj_x = torch.randn(batch, n - r, channels)
    proj_size = torch.randn(batch, n - r, 1)

    fn = merge.pitome_vision(metric=metric, ratio=ratio, margin=margin, class_token=True, alpha=alpha,
                             use_bsm_pitome=bipartite)
    x_in = x.clone().requires_grad_(True)
    x_out, size_out = merge.merge_wavg(fn, x_in, size.clone())
    source_out = merge.merge_source(fn, x, source.clone()) if with_source else None
    ((x_out * proj_x).sum() + (size_out * proj_size).sum()).backward()
    if with_source:                                        # 0/1 maps: stored as bool to keep the files small
        source, source_out = source.bool(), source_out.bool()
    return {"x": x, "metric": metric, "size": size, "source": source, "proj_x": proj_x, "proj_size": proj_size,
            "x_out": x_out.detach(), "size_out": size_out.detach(), "source_out": source_out, "grad_x": x_in.grad,
            "meta": {"ratio": ratio, "r": r, "margin": margin, "alpha": alpha, "bipartite": bipartite}}


# Gradients kept (a few, to keep the file small): the head, blocks before, between and after the merges.
KEEP_GRADS = ("head.", "blocks.0.attn.qkv.", "blocks.2.mlp.fc1.", "blocks.3.attn.proj.", "patch_embed.", "cls_token")


def vit_case(deit_patch, *, ratio: float, seed: int) -> dict:
    from timm.models.vision_transformer import VisionTransformer
    spec = dict(img_size=32, patch_size=4, embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=5)
    torch.manual_seed(seed)
    model = VisionTransformer(**spec, drop_path_rate=0.0)
    deit_patch.apply_patch(model)
    model.ratio = ratio                                    # main_ic.py's get_model: the keep ratio of every block
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        eval_logits, _ = model(images)                     # the patched forward also returns its FLOP estimate
    model.train()
    train_logits, _ = model(images)
    proj = torch.randn_like(train_logits)
    (train_logits * proj).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None and k.startswith(KEEP_GRADS)}
    margins = [block.margin for block in model.blocks]
    return {"spec": spec, "ratio": ratio, "margins": margins,
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "images": images, "eval_logits": eval_logits, "train_logits": train_logits.detach(), "proj": proj,
            "grads": grads}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    checkout = Path(argv[0]).resolve()
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    merge, deit_patch = official_modules(checkout)

    torch.set_num_threads(1)
    cases = {
        "step_protecting": step_case(merge, batch=2, patches=64, channels=12, in_dim=8, ratio=0.8, margin=0.5,
                                     alpha=1.0, bipartite=False, seed=0),
        "step_protecting_alpha": step_case(merge, batch=1, patches=196, channels=8, in_dim=16, ratio=0.9,
                                           margin=0.3, alpha=0.5, bipartite=False, seed=10, with_source=False),
        "step_bipartite": step_case(merge, batch=2, patches=64, channels=12, in_dim=8, ratio=0.7, margin=0.75,
                                    alpha=1.0, bipartite=True, seed=20),
    }
    for name, case in cases.items():
        torch.save(case, out / f"{name}.pt")
    torch.save(vit_case(deit_patch, ratio=0.8, seed=30), out / "vit.pt")
    print(f"wrote {', '.join(cases)} and vit to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Write the FPET golden tensors by running the OFFICIAL code (github.com/kyk120/fpet) on small fixed inputs.

    python tests/data/golden/fpet/make_golden.py <official checkout> [<output dir>]

The checkout is imported as it is (``fpet.merge_fpet``, ``fpet.apply_fpet``, ``adaptformer.Adapter``); nothing
of it is copied here. This script only builds inputs, calls the official functions and saves what they
return (README.md beside it: the commit and the environment). Two kinds of files:

- ``step_*.pt``: one reduction step — the official refinement adapter on a key metric (``metric.detach() +
  refinement(metric)``, the lines of ``FPETBlock.forward``), ``bipartite_diff_matching`` and ``merge_wavg``
  on tokens ``x`` with sizes; the merged tokens and sizes, and the gradients of a fixed linear function of
  them with respect to ``x`` and the refinement's two weights (the straight-through relaxation).
- ``vit.pt``: a tiny timm ViT patched by the official ``apply_patch`` (one FPET layer): its weights, eval
  logits, and train-mode logits and gradients (dropout and drop-path at 0).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def refinement(adapter_cls, in_dim: int, seed: int):
    """The official refinement module (``Adapter(dim=32, bit=1, in_dim=dim_key)``), dropout off."""
    torch.manual_seed(seed)
    module = adapter_cls(dim=32, bit=1, in_dim=in_dim)
    module.dropout.p = 0.0
    return module


def step_case(merge_fpet, adapter_cls, *, batch: int, grid: int, channels: int, in_dim: int,
              with_size: bool, seed: int) -> dict:
    torch.manual_seed(seed)
    n = grid * grid + 1                                    # class token first, as the official ViT has it
    x = torch.randn(batch, n, channels)
    metric = torch.randn(batch, n, in_dim)
    size = torch.randint(1, 4, (batch, n, 1)).float() if with_size else None
    if size is not None:
        size[:, 0] = 1.0                                   # the class token never merges
    proj_x = torch.randn(batch, grid * grid // 2 + 1, channels)
    proj_size = torch.randn(batch, grid * grid // 2 + 1, 1)
    ref = refinement(adapter_cls, in_dim, seed + 1)
    weights = {"down": ref.adapter_down.weight.detach().clone(), "up": ref.adapter_up.weight.detach().clone()}

    x_in = x.clone().requires_grad_(True)
    refined = metric.detach() + ref(metric.detach())
    merge = merge_fpet.bipartite_diff_matching(refined, class_token=True, distill_token=False)
    x_out, size_out = merge_fpet.merge_wavg(merge, x_in, None if size is None else size.clone())
    loss = (x_out * proj_x).sum() + (size_out * proj_size).sum()
    loss.backward()
    return {"x": x, "metric": metric, "size": size, "weights": weights, "proj_x": proj_x, "proj_size": proj_size,
            "x_out": x_out.detach(), "size_out": size_out.detach(), "grad_x": x_in.grad,
            "grad_down": ref.adapter_down.weight.grad, "grad_up": ref.adapter_up.weight.grad,
            "meta": {"grid": grid, "in_dim": in_dim, "refine_dim": 32}}


# Gradients kept (a few, to keep the file small): the refinement, the head, a layer before and one after the merge.
KEEP_GRADS = ("blocks.1.refinement.", "head.", "blocks.0.attn.qkv.", "blocks.2.mlp.fc1.", "patch_embed.")


def vit_case(apply_fpet, *, seed: int) -> dict:
    from timm.models.vision_transformer import VisionTransformer
    spec = dict(img_size=32, patch_size=4, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5)
    torch.manual_seed(seed)
    model = VisionTransformer(**spec, drop_path_rate=0.0)
    apply_fpet.apply_patch(model, r_layer=1, dim_key=spec["embed_dim"] // spec["num_heads"])
    model.blocks[1].refinement.dropout.p = 0.0
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        eval_logits = model(images)
    model.train()
    train_logits = model(images)
    proj = torch.randn_like(train_logits)
    (train_logits * proj).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None and k.startswith(KEEP_GRADS)}
    return {"spec": spec, "fpet_layer": 1, "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "images": images, "eval_logits": eval_logits, "train_logits": train_logits.detach(), "proj": proj,
            "grads": grads}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    checkout = Path(argv[0]).resolve()
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    sys.path.insert(0, str(checkout))
    import adaptformer
    from fpet import apply_fpet, merge_fpet

    torch.set_num_threads(1)
    cases = {
        "step_grid14": step_case(merge_fpet, adaptformer.Adapter, batch=1, grid=14, channels=8, in_dim=16,
                                 with_size=False, seed=0),
        "step_grid8_sizes": step_case(merge_fpet, adaptformer.Adapter, batch=2, grid=8, channels=12, in_dim=8,
                                      with_size=True, seed=10),
    }
    for name, case in cases.items():
        torch.save(case, out / f"{name}.pt")
    torch.save(vit_case(apply_fpet, seed=20), out / "vit.pt")
    print(f"wrote {', '.join(cases)} and vit to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

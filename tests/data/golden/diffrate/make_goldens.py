"""Run the official DiffRate code on small fixed inputs and save what it computes (README.md: how and with what).

    python make_goldens.py /path/to/DiffRate-checkout [out_dir]

Nothing of the official code is in this file: it is imported from the checkout given as the argument. Three
cases, each saved as ``<case>.pt`` (a dict of tensors, readable with ``torch.load(weights_only=True)``):

- ``step_eval``: one official ``DiffRateBlock`` in eval mode whose attention and MLP are replaced by stubs
  (the attention hands over a given attention map and adds nothing; the MLP adds nothing), so that its output is
  the reduction step alone: sorting by class attention, pruning, merging, sizes and source map;
- ``step_train``: the same block in training mode (the search's relaxation) with given token mask and sizes and
  random rate parameters: tokens, sizes, mask, kept counts, and the gradients of a fixed functional of them with
  respect to the rate parameters and the tokens;
- ``model``: a tiny ViT patched by the official ``apply_patch``, with random rate parameters: its weights, the
  training forward (logits, FLOPs, kept counts) and the gradients of cross-entropy and of the FLOPs with respect to
  the rate parameters, then the eval forward with the counts that training forward left.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn


class StubAttention(nn.Module):
    """Adds nothing to the tokens and hands over a fixed attention map (B×H×N×N)."""

    def __init__(self, attn: torch.Tensor) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x, size=None, mask=None):
        return torch.zeros_like(x), self.attn


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def stub_block(deit, timm_block, dim: int, heads: int, patches: int, granularity: int, attn: torch.Tensor):
    block = timm_block(dim, heads)
    block.__class__ = deit.DiffRateBlock
    block.introduce_diffrate(patches, granularity, granularity)
    block.attn, block.mlp, block.drop_path = StubAttention(attn), Zero(), nn.Identity()
    return block


def attention_map(gen: torch.Generator, batch: int, heads: int, tokens: int, dropped: torch.Tensor | None = None):
    """A random attention map; keys marked in ``dropped`` (B×N bool) get almost no attention, as masked keys."""
    logits = torch.randn(batch, heads, tokens, tokens, generator=gen) * 2
    if dropped is not None:
        logits = logits.masked_fill(dropped[:, None, None, :], -30.0)
    return logits.softmax(dim=-1)


def step_eval(deit, timm_block) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batch, heads, dim, patches = 2, 2, 8, 24
    tokens = patches + 1
    x = torch.randn(batch, tokens, dim, generator=gen)
    size = 1 + 2 * torch.rand(batch, tokens, 1, generator=gen)
    attn = attention_map(gen, batch, heads, tokens)
    source = torch.eye(tokens).expand(batch, tokens, tokens).contiguous()
    block = stub_block(deit, timm_block, dim, heads, patches, 4, attn).eval()
    prune_kept, merge_kept = 1 + 18, 1 + 11          # official counts include the class token
    block.prune_ddp.kept_token_number, block.merge_ddp.kept_token_number = prune_kept, merge_kept
    block._diffrate_info = {"size": size.clone(), "mask": torch.ones(batch, tokens), "source": source.clone(),
                            "trace_source": True}
    with torch.no_grad():
        out = block(x)
    info = block._diffrate_info
    assert out.shape[1] == merge_kept and bool((info["size"] > 0).all())
    return {"x": x, "size": size, "attn": attn, "source": source, "prune_kept": torch.tensor(prune_kept),
            "merge_kept": torch.tensor(merge_kept), "out_x": out, "out_size": info["size"],
            "out_source": info["source"]}


def step_train(deit, timm_block) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    batch, heads, dim, patches, granularity = 2, 2, 8, 24, 3
    tokens = patches + 1
    x = torch.randn(batch, tokens, dim, generator=gen).requires_grad_(True)
    size = torch.ones(batch, tokens, 1)
    size[:, 1:9] += torch.randint(0, 3, (batch, 8, 1), generator=gen).float()
    mask = torch.ones(batch, tokens)
    dropped = torch.zeros(batch, tokens, dtype=torch.bool)
    dropped[:, [4, 11, 17]] = True                     # tokens an earlier layer dropped (same count in each image)
    mask[dropped] = 0
    attn = attention_map(gen, batch, heads, tokens, dropped)
    block = stub_block(deit, timm_block, dim, heads, patches, granularity, attn).train()
    prune_logits = torch.randn(len(block.prune_ddp.selected_probability), generator=gen) * 2
    merge_logits = torch.randn(len(block.merge_ddp.selected_probability), generator=gen) * 2
    with torch.no_grad():
        block.prune_ddp.selected_probability.copy_(prune_logits)
        block.merge_ddp.selected_probability.copy_(merge_logits)
    block._diffrate_info = {"size": size.clone(), "mask": mask.clone(), "source": None, "trace_source": False,
                            "prune_kept_num": [], "merge_kept_num": []}
    out = block(x)
    info = block._diffrate_info
    prune_num, merge_num = info["prune_kept_num"][0], info["merge_kept_num"][0]
    alive = tokens - 3
    assert prune_num < alive and merge_num < prune_num, (prune_num, merge_num)   # both steps act
    w_x, w_mask, w_size = (torch.randn(t.shape, generator=gen) for t in (out, info["mask"], info["size"]))
    functional = ((out * w_x).sum() + (info["mask"] * w_mask).sum() + (info["size"] * w_size).sum()
                  + 0.3 * prune_num + 0.7 * merge_num)
    functional.backward()
    return {"x": x.detach(), "size": size, "mask": mask, "attn": attn, "prune_logits": prune_logits,
            "merge_logits": merge_logits, "granularity": torch.tensor(granularity),
            "candidates": block.prune_ddp.kept_token_candidate.detach().clone(),
            "out_x": out.detach(), "out_size": info["size"].detach(), "out_mask": info["mask"].detach(),
            "prune_kept": prune_num.detach(), "merge_kept": merge_num.detach(), "w_x": w_x, "w_mask": w_mask,
            "w_size": w_size, "grad_x": x.grad, "grad_prune_logits": block.prune_ddp.selected_probability.grad,
            "grad_merge_logits": block.merge_ddp.selected_probability.grad}


def model_case(diffrate_patch) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(3)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=5,
                              drop_rate=0.0, drop_path_rate=0.0)
    diffrate_patch.deit(model, prune_granularity=2, merge_granularity=2)
    gen = torch.Generator().manual_seed(4)
    logits = {}
    for i, block in enumerate(model.blocks):
        for kind in ("prune", "merge"):
            p = getattr(block, f"{kind}_ddp").selected_probability
            if i > 0:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 1.5)
            logits[f"{i}.{kind}"] = p.detach().clone()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "_ddp." not in k}
    images = torch.randn(4, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 3, 1, 4])
    arch = [p for n, p in model.named_parameters() if n.endswith("selected_probability")]
    model.train()
    out, flops = model(images)
    loss = nn.functional.cross_entropy(out, labels)
    grads_ce = torch.autograd.grad(loss, arch, retain_graph=True, allow_unused=True)
    grads_flops = torch.autograd.grad(flops, arch, allow_unused=True)
    info = model._diffrate_info
    train_kept = torch.tensor([[float(p), float(m)] for p, m in zip(info["prune_kept_num"], info["merge_kept_num"])])
    prune_counts, merge_counts = model.get_kept_num()
    model.eval()
    with torch.no_grad():
        out_eval, flops_eval = model(images)
    names = [n for n, _ in model.named_parameters() if n.endswith("selected_probability")]
    out = {"images": images, "labels": labels, "train_logits": out.detach(), "train_flops": flops.detach(),
           "train_kept": train_kept, "eval_logits": out_eval, "eval_flops": torch.as_tensor(float(flops_eval)),
           "eval_prune_kept": torch.tensor(prune_counts), "eval_merge_kept": torch.tensor(merge_counts)}
    out.update({f"weight.{k}": v for k, v in weights.items()})
    out.update({f"logits.{k}": v for k, v in logits.items()})
    for name, g_ce, g_flops in zip(names, grads_ce, grads_flops):
        block, kind = name.split(".")[1], name.split(".")[2].split("_")[0]
        out[f"grad_ce.{block}.{kind}"] = torch.zeros_like(logits[f"{block}.{kind}"]) if g_ce is None else g_ce
        out[f"grad_flops.{block}.{kind}"] = torch.zeros_like(logits[f"{block}.{kind}"]) if g_flops is None else g_flops
    return out


def main(argv: list[str]) -> int:
    checkout = Path(argv[0]).resolve()
    out_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    sys.path.insert(0, str(checkout))
    import importlib

    import DiffRate.patch as diffrate_patch
    deit = importlib.import_module("DiffRate.patch.deit")   # the package's name ``deit`` is its apply_patch
    from timm.models.vision_transformer import Block
    torch.set_num_threads(1)
    for name, case in (("step_eval", lambda: step_eval(deit, Block)), ("step_train", lambda: step_train(deit, Block)),
                       ("model", lambda: model_case(diffrate_patch))):
        data = case()
        torch.save({k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in data.items()},
                   out_dir / f"{name}.pt")
        print(f"wrote {out_dir / f'{name}.pt'} ({len(data)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Write the DTEM golden tensors by running the OFFICIAL code (github.com/movinghoon/DTEM) on small fixed inputs.

    python tests/data/golden/dtem/make_golden.py <official checkout> [<output dir>]

The checkout is imported as it is (its ``dtem`` package: ``patch``, ``DTEMBlock``, ``DTEMLinear``); nothing of it
is copied here. This script only builds inputs, calls the official code and saves what it returns (README.md
beside it: the commit and the environment). Files:

- ``step_eval.pt``: one eval-mode reduction of an official patched block: the metric from its ``DTEMLinear`` (the
  fused qkv + embedding weight of eval mode) on fixed attention inputs, then ``DTEMBlock.merge`` (ToMe's hard
  bipartite matching on that metric, size-weighted average) on tokens with sizes 1-3.
- ``step_train.pt``: the training-time relaxation of the same block (``DTEMBlock.merge`` in train mode: top-k
  candidates, iterated soft k-hot selection, soft merge, tokens sorted by size), on all tokens and with only the
  first ``n`` active; outputs and the gradients of a fixed linear function of them with respect to the tokens,
  the sizes and the embedding's weight and bias.
- ``vit.pt``: a tiny timm ViT patched by the official ``patch`` (``k2=3, tau1=tau2=0.1``): its weights, eval
  logits, and train-mode logits and gradients of a fixed projection of them (dropout and drop-path at 0).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")   # torch.cuda.amp.autocast on a CPU machine, timm deprecations


def official_block(dtem_module, *, dim: int, heads: int, k2: int, tau1: float, tau2: float, seed: int):
    """A timm Block patched as the official ``DTEM.patch`` patches each block (embedding width: the official rule)."""
    from timm.models.vision_transformer import Block

    torch.manual_seed(seed)
    block = Block(dim, heads, mlp_ratio=2.0, qkv_bias=True)
    block.__class__ = dtem_module.DTEMBlock
    block.patch(k2, tau1, tau2, feat_dim=None)
    return block


def step_case(dtem_module, *, training: bool, batch: int, n_tokens: int, active: int, dim: int, heads: int,
              r: int, seed: int) -> dict:
    block = official_block(dtem_module, dim=dim, heads=heads, k2=3, tau1=0.1, tau2=0.1, seed=seed)
    linear = block.attn.qkv                                      # the official DTEMLinear
    torch.manual_seed(seed + 1)
    features = torch.randn(batch, n_tokens, dim)                 # what the attention receives: norm1(x)
    x = torch.randn(batch, n_tokens, dim)
    size = torch.randint(1, 4, (batch, n_tokens)).float()
    size[:, 0] = 1.0                                             # the class token
    n_out = n_tokens if training else n_tokens - min(r, (n_tokens - 1) // 2)
    proj_x, proj_size = torch.randn(batch, n_out, dim), torch.randn(batch, n_out)
    weights = {"weight": linear.metric_layer.weight.detach().clone(), "bias": linear.metric_layer.bias.detach().clone()}
    block.train(training)                                        # eval: DTEMLinear.update() fuses the weights
    x_in, size_in = x.clone().requires_grad_(training), size.clone().requires_grad_(training)
    _, metric = linear(features)
    x_out, size_out, n_left, _ = block.merge(x_in, size_in, r, active, {"metric": metric})
    out = {"features": features, "x": x, "size": size, "weights": weights, "r": r, "active": active,
           "x_out": x_out.detach(), "size_out": size_out.detach(), "n_left": n_left,
           "proj_x": proj_x, "proj_size": proj_size, "meta": {"k2": 3, "tau1": 0.1, "tau2": 0.1, "heads": heads}}
    if training:
        ((x_out * proj_x).sum() + (size_out * proj_size).sum()).backward()
        out.update(grad_x=x_in.grad, grad_size=size_in.grad, grad_weight=linear.metric_layer.weight.grad,
                   grad_bias=linear.metric_layer.bias.grad)
    return out


def vit_case(dtem_module, seed: int = 0) -> dict:
    from timm.models.vision_transformer import VisionTransformer

    spec = {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0,
            "num_classes": 5}
    torch.manual_seed(seed)
    model = VisionTransformer(**spec, drop_path_rate=0.0)
    model = dtem_module.patch(model, k2=3, tau1=0.1, tau2=0.1, feat_dim=None)
    r = [12, 8, 6]
    model.update_r(r)
    torch.manual_seed(seed + 1)
    images = torch.randn(2, 3, 32, 32)
    proj = torch.randn(2, 5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        eval_logits = model(images)
    model.train()
    train_logits = model(images)
    (train_logits * proj).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return {"spec": spec, "r": r, "state_dict": state, "images": images, "proj": proj,
            "eval_logits": eval_logits, "train_logits": train_logits.detach(), "grads": grads}


def main(checkout: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(checkout).resolve()))
    import dtem.dtem as dtem_module  # the official package of the checkout

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(step_case(dtem_module, training=False, batch=2, n_tokens=17, active=17, dim=12, heads=2, r=5,
                         seed=0), out / "step_eval.pt")
    train = {"all": step_case(dtem_module, training=True, batch=2, n_tokens=17, active=17, dim=12, heads=2, r=5,
                              seed=10),
             "partial": step_case(dtem_module, training=True, batch=2, n_tokens=17, active=12, dim=12, heads=2,
                                  r=4, seed=20)}
    torch.save(train, out / "step_train.pt")
    torch.save(vit_case(dtem_module), out / "vit.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).resolve().parent))

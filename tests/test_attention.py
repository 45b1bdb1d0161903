"""Proportional attention without a mask: log(size) as one extra head feature equals the masked form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.vit import MergingAttention, set_size_bias, size_bias_attention

TOL = 1e-5


def _sizes(batch: int, n: int, class_token: bool, generator: torch.Generator) -> torch.Tensor:
    """Random token sizes B×N (merged tokens stand for 1..40 patches); a class token never merges (size 1)."""
    size = torch.randint(1, 41, (batch, n), generator=generator).float()
    if class_token:
        size[:, 0] = 1.0
    return size


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (3, 2, 50, 16), (1, 4, 9, 64)])
@pytest.mark.parametrize("multiple", [1, 8])
def test_feature_form_equals_masked_form_values_and_gradients(class_token, shape, multiple):
    batch, heads, n, dim = shape
    g = torch.Generator().manual_seed(n * dim + int(class_token))
    q, k, v = (torch.randn(*shape, generator=g, requires_grad=True) for _ in range(3))
    size = _sizes(batch, n, class_token, g)
    scale = dim ** -0.5
    grad_out = torch.randn(*shape, generator=g)

    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=size.log().view(batch, 1, 1, n))
    feature = size_bias_attention(q, k, v, size, scale, multiple=multiple)
    explicit = ((q @ k.transpose(-2, -1)) * scale + size.log().view(batch, 1, 1, n)).softmax(-1) @ v
    assert feature.shape == masked.shape
    assert torch.allclose(feature, masked, atol=TOL, rtol=0)
    assert torch.allclose(feature, explicit, atol=TOL, rtol=0)

    grads = [torch.autograd.grad(out, (q, k, v), grad_out) for out in (masked, feature)]
    for g_masked, g_feature in zip(*grads):
        assert torch.allclose(g_feature, g_masked, atol=TOL, rtol=0)


def test_feature_form_with_unit_sizes_is_plain_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 11, 8, generator=g) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(size_bias_attention(q, k, v, torch.ones(2, 11), 8 ** -0.5), plain, atol=TOL, rtol=0)


def _merging_model(class_token: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {} if class_token else dict(class_token=False, global_pool="avg")
    model = create_model("vit", num_classes=5, embed_dim=48, depth=3, num_heads=3, patch_size=4, img_size=16,
                         merging=[5, 4, 3], pyra=True, peft_dropout=0.0, drop_path_rate=0.0, **extra)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)   # PYRA and LoRA off their initial values
    return model


@pytest.mark.parametrize("class_token", [False, True])
def test_model_logits_and_gradients_same_in_both_forms(class_token):
    """The whole merged PYRA model: the sizes are those the merges really produce, layer after layer."""
    model = _merging_model(class_token).train()
    assert all(isinstance(b.attn, MergingAttention) for b in model.blocks)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 4])
    results = []
    for form in ("mask", "feature"):
        set_size_bias(model, form)
        model.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l_mask, g_mask), (l_feat, g_feat) = results
    assert torch.allclose(l_feat, l_mask, atol=TOL, rtol=0)
    assert g_mask.keys() == g_feat.keys()
    for name in g_mask:
        assert torch.allclose(g_feat[name], g_mask[name], atol=TOL, rtol=0), name


def test_set_size_bias_checks_the_form_and_defaults_by_device():
    from models.vit import SIZE_BIAS_BY_DEVICE

    model = _merging_model(True)
    assert all(b.attn.size_bias is None for b in model.blocks)   # the device default
    assert SIZE_BIAS_BY_DEVICE["cpu"] in ("mask", "feature")
    set_size_bias(model, "feature")
    assert all(b.attn.size_bias == "feature" for b in model.blocks)
    with pytest.raises(ValueError, match="size_bias"):
        set_size_bias(model, "flash")

"""Model behaviour: merging schedules and token bookkeeping, PYRA's formula and identity at init,
PEFT freezing, LoRA folding, fused attention and checkpoint loading."""
import numpy as np
import pytest
import torch

from models import (
    BACKBONES,
    PYRA,
    CheckpointError,
    bipartite_soft_matching,
    create_model,
    fold_lora,
    load_checkpoint,
    merge_source,
    merge_wavg,
    param_report,
    parse_r,
)
from models.backbones import named_schedule
from models.peft import LoRALinear

TINY = dict(embed_dim=48, depth=4, num_heads=3, patch_size=4, img_size=32)  # 64 patches + cls = 65 tokens


def tiny(**kwargs):
    torch.manual_seed(0)
    args = dict(num_classes=10, **TINY)
    args.update(kwargs)
    return create_model("vit", **args).eval()


def randomize_trainable(model, seed=1):
    """Make PEFT and PYRA non-trivial (PYRA's token-wise generator starts at 0, i.e. the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def expected_counts(n, schedule, protected):
    counts = [n]
    for r in schedule:
        n -= min(r, (n - protected) // 2)
        counts.append(n)
    return counts


def token_counts(model, img_size):
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for b in model.blocks]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])))
    with torch.no_grad():
        model(torch.randn(1, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    return counts


# --- schedules and token counts -------------------------------------------------------------------

def test_vit_b_high_token_counts_match_paper():
    model = create_model("vit_base_patch16_224_in21k", num_classes=10, merging="high").eval()
    assert token_counts(model, 224) == [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]


@pytest.mark.parametrize("name", ["vit_base_patch16_224_in21k", "vit_large_patch16_224_in21k",
                                  "deit_small_distilled_patch16_224"])
def test_named_schedules_token_counts(name):
    model = create_model(name, num_classes=10, peft="none").eval()
    protected = 2 if "deit" in name else 1
    for schedule in ("low", "high"):
        model.r = named_schedule(schedule, name)
        assert model.r == named_schedule(schedule, name) and len(model.r) == BACKBONES[name].depth
        assert token_counts(model, 224) == expected_counts(196 + protected, model.r, protected)


def test_schedule_sharing_between_backbones():
    for s in ("low", "high"):
        vit_b = named_schedule(s, "vit_base_patch16_224_in21k")
        assert named_schedule(s, "vit_small_patch16_224_in21k") == vit_b
        assert named_schedule(s, "mae_vit_base_patch16") == vit_b
        assert named_schedule(s, "deit_small_distilled_patch16_224") == named_schedule(
            s, "deit_base_distilled_patch16_224")
        assert named_schedule(s, "mae_vit_large_patch16") == named_schedule(s, "vit_large_patch16_224_in21k")
    assert named_schedule("low", "deit_base_distilled_patch16_224") == [16] * 6 + [10] * 6
    assert sum(named_schedule("high", "vit_large_patch16_224_in21k")) == 24768 - 24 * 1024


def test_parse_r_forms():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(4, [5, 2]) == [5, 2, 0, 0]
    assert parse_r(3, (8, 0.5)) == [4, 8, 12]
    assert parse_r(3, {"r": 8, "inflection": 0.5}) == [4, 8, 12]  # YAML has no tuples
    assert parse_r(3, (8, -0.5)) == [12, 8, 4]                     # ToMe's decreasing schedule
    assert parse_r(3, {"r": 8, "inflection": -1}) == [16, 8, 0]
    assert parse_r(4, [16, 0]) == [16, 0, 0, 0]                    # a list is always per layer
    assert parse_r(4, [16, 1]) == [16, 1, 0, 0]
    for bad in ([8, 0.5], (8, 1.5), {"r": 8, "slope": 1}, -1, "low"):
        with pytest.raises(ValueError):
            parse_r(3, bad)
    with pytest.raises(ValueError, match="3 entries but the model has 2"):
        parse_r(2, [1, 2, 3])


# --- merging bookkeeping ----------------------------------------------------------------------------

def test_class_token_first_never_merged_and_sizes_sum_to_patches():
    model = tiny(merging=[10, 10, 10, 10], trace_source=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, size, source = model.forward_tokens(x)
    assert tokens.shape[1] == 65 - 40
    assert torch.equal(size[:, 0, 0], torch.ones(2))                       # class token alone
    assert torch.equal(source[:, 0], torch.eye(65)[0].expand(2, 65))       # and first
    assert torch.all(size.sum(dim=(1, 2)) == 65)                            # 64 patches + cls
    # merge_source rows: every token's row sums to its size; every input token lies in exactly one row
    assert torch.allclose(source.sum(-1), size[..., 0])
    assert torch.equal(source.sum(1), torch.ones(2, 65))


def test_distillation_token_protected():
    torch.manual_seed(0)
    model = create_model("deit_small_distilled_patch16_224", num_classes=5, merging=[60] * 12, peft="none",
                         trace_source=True).eval()
    with torch.no_grad():
        tokens, size, source = model.forward_tokens(torch.randn(1, 3, 224, 224))
    eye = torch.eye(198)
    assert torch.equal(source[0, 0], eye[0]) and torch.equal(source[0, 1], eye[1])
    assert size[0, 0, 0] == 1 and size[0, 1, 0] == 1
    assert size.sum() == 198


def test_bipartite_matching_protects_and_pairs():
    metric = torch.randn(3, 9, 8)
    merge, unmerge = bipartite_soft_matching(metric, 3, class_token=True)
    x = torch.arange(9.0)[None, :, None].expand(3, 9, 1)
    merged = merge(x, mode="amax")
    assert merged.shape == (3, 6, 1) and torch.all(merged[:, 0, 0] == 0)
    assert unmerge(merged).shape == (3, 9, 1)
    nothing, _ = bipartite_soft_matching(metric[:, :2], 5, class_token=True)   # clamped to 0
    assert nothing(x[:, :2]) is x[:, :2] or torch.equal(nothing(x[:, :2]), x[:, :2])


def test_merge_wavg_is_size_weighted_mean():
    metric = torch.randn(1, 6, 4)
    merge, _ = bipartite_soft_matching(metric, 2)
    x, size = torch.randn(1, 6, 3), torch.tensor([[1.0, 2.0, 3.0, 1.0, 4.0, 2.0]])[..., None]
    out, out_size = merge_wavg(merge, x, size)
    source = merge_source(merge, x)                                        # which inputs each output holds
    expected = (source @ (x * size)) / (source @ size)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(out_size, source @ size)


# --- PYRA ---------------------------------------------------------------------------------------------

def test_pyra_init_equals_plain_tome_exactly():
    plain = tiny(merging=[8, 6, 4, 2])
    with_pyra = tiny(merging=[8, 6, 4, 2], pyra=True)
    with_pyra.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), with_pyra(x))


def test_pyra_matches_independent_formula():
    torch.manual_seed(0)
    pyra = PYRA(5, 16)
    with torch.no_grad():
        pyra.to_token_weight.normal_()
        pyra.norm.weight.normal_()
        pyra.norm.bias.normal_()
    src, dst = torch.randn(2, 3, 16), torch.randn(2, 3, 16)   # r = 3 < 5 rows: clamped merge
    out = pyra(src, dst)
    ref = torch.empty_like(src)
    wr, wd = pyra.to_channel_weight.detach()[:3, 0], pyra.to_token_weight.detach()[0]
    for b in range(2):
        m = torch.nn.functional.layer_norm(src[b] + dst[b], (16,), pyra.norm.weight, pyra.norm.bias, 1e-5)
        delta_d = sum(wr[i] * m[i] for i in range(3))                           # D
        for i in range(3):
            delta_r = (m[i] * wd).sum()                                          # scalar
            ref[b, i] = src[b, i] + src[b, i] * 2 * torch.sigmoid(delta_d) * (2 * torch.sigmoid(delta_r) - 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert pyra.to_channel_weight.shape == (5, 1) and pyra.to_token_weight.shape == (1, 16)
    assert torch.all(PYRA(400, 4).to_channel_weight.abs() <= 1)                          # uniform(-1, 1)
    with pytest.raises(ValueError, match="layer 7"):
        PYRA(2, 16, layer=7)(src, dst)


def test_pyra_param_counts_vit_b():
    model = create_model("vit_base_patch16_224_in21k", num_classes=100, merging="high", pyra=True)
    report = param_report(model)
    assert report["lora"] == (294912, 294912)
    assert report["pyra"] == (27840, 27840)
    assert report["head"] == (76900, 76900)
    assert report["total"][0] == 86198308
    model.r = named_schedule("low", "vit_base_patch16_224_in21k")  # fits "high" modules
    low = create_model("vit_base_patch16_224_in21k", num_classes=100, merging="low", pyra=True)
    assert param_report(low)["pyra"][0] == 27834


def test_clamped_r_and_zero_r_do_not_crash():
    model = tiny(merging=[40, 40, 0, 40], pyra=True)
    randomize_trainable(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert token_counts(model, 32) == expected_counts(65, [40, 40, 0, 40], 1)
    assert token_counts(model, 32)[-1] >= 1


def test_larger_r_than_built_names_layer():
    model = tiny(merging=[2, 2, 2, 2], pyra=True)
    model.r = [2, 5, 2, 2]
    with pytest.raises(ValueError, match="layer 1"):
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="layer 0"):
        tiny(merging=[0, 2, 2, 2], pyra=True).r = [3, 2, 2, 2]


def test_pyra_without_merging_is_an_error():
    with pytest.raises(ValueError, match="needs a merging schedule"):
        tiny(pyra=True)


# --- PEFT ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("peft", ["lora", "adapter", "none", "full"])
def test_gradients_reach_exactly_the_trainable_parameters(peft):
    model = tiny(peft=peft, merging=[8, 8, 4, 4], pyra=True).train()
    randomize_trainable(model)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    last = f"blocks.{len(model.blocks) - 1}.reduction.pyra."
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif name.startswith(last):
            # Tokens merged in the last block never reach the class token again (the MLP is per token),
            # so with class-token pooling the last PYRA has no effect on the logits: exactly zero gradient.
            assert p.grad is not None and p.grad.abs().sum() == 0, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    trainable = param_report(model)
    assert trainable["backbone"][1] == (trainable["backbone"][0] if peft == "full" else 0)
    assert trainable["pyra"][1] > 0 and trainable["head"][1] > 0
    assert (trainable["lora"][1] > 0) == (peft == "lora") and (trainable["adapter"][1] > 0) == (peft == "adapter")


def test_official_and_standard_init():
    std = tiny(peft="lora", peft_init="standard")
    off = tiny(peft="lora", peft_init="official")
    qkv_std, qkv_off = std.blocks[0].attn.qkv, off.blocks[0].attn.qkv
    assert torch.count_nonzero(qkv_std.lora_up.weight) == 0
    assert 0.015 < qkv_off.lora_up.weight.std() < 0.025 and abs(qkv_off.lora_up.weight.mean()) < 0.005
    ad_std, ad_off = tiny(peft="adapter", peft_init="standard"), tiny(peft="adapter", peft_init="official")
    assert ad_std.blocks[0].adapter.down.bias.abs().max() < 1e-4 and ad_std.blocks[0].adapter.down.bias.abs().max() > 0
    assert torch.count_nonzero(ad_off.blocks[0].adapter.down.bias) == 0


def test_zero_lora_equals_frozen_backbone():
    base = tiny(peft="none")
    lora = tiny(peft="lora", peft_init="official")
    lora.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for b in lora.blocks:
            b.attn.qkv.lora_up.weight.zero_()
        x = torch.randn(3, 3, 32, 32)
        assert torch.allclose(base(x), lora(x), atol=1e-6)


@pytest.mark.parametrize("merging", [None, [8, 8, 8, 8]])
def test_fold_lora_is_exact(merging):
    model = tiny(peft="lora", merging=merging, pyra=merging is not None)
    randomize_trainable(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        fold_lora(model)
        after = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)


def test_fused_attention_equals_explicit_softmax_with_sizes():
    model = tiny(merging=[10, 8, 6, 4], pyra=True)
    randomize_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        for b in model.blocks:
            b.attn.fused_attn = False
        explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_prop_attn_changes_result_only_after_merging():
    model = tiny(merging=[10, 8, 6, 4])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on = model(x)
        model.prop_attn = False
        off = model(x)
        model.r = 0
        plain_off = model(x)
        model.prop_attn = True
        plain_on = model(x)
    assert not torch.allclose(on, off)
    assert torch.equal(plain_off, plain_on)


def test_mae_pooling_is_size_weighted():
    torch.manual_seed(0)
    model = create_model("vit", num_classes=3, global_pool="avg", merging=[8, 8, 8, 8], **TINY).eval()
    assert model.fc_norm.__class__.__name__ == "LayerNorm"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, size, _ = model.forward_tokens(x)
        pooled = (tokens[:, 1:] * size[:, 1:]).sum(1) / 64
        assert torch.allclose(model(x), model.head(model.fc_norm(pooled)), atol=1e-5)


def test_deit_heads_averaged_and_both_trained():
    torch.manual_seed(0)
    model = create_model("deit_small_distilled_patch16_224", num_classes=4, merging="high", pyra=True,
                         img_size=64).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.head_dist.weight.grad.abs().sum() > 0


# --- checkpoints ------------------------------------------------------------------------------------------

def _jax_npz(model, path, head_classes=21843):
    """Write ``model``'s backbone in Google's ViT .npz layout (the format of ViT-B_16.npz)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": np.zeros((d, head_classes), np.float32), "head/bias": np.zeros(head_classes, np.float32),
         "pre_logits/kernel": np.zeros((d, d), np.float32), "pre_logits/bias": np.zeros(d, np.float32)}
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[mha + n + "/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            w[mha + n + "/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_load_jax_npz_checkpoint(tmp_path):
    source = tiny(peft="none")
    path = tmp_path / "ViT-tiny.npz"
    _jax_npz(source, path)
    torch.manual_seed(123)
    model = create_model("vit", num_classes=10, merging=[8, 8, 8, 8], pyra=True, peft_init="standard", **TINY).eval()
    report = load_checkpoint(model, str(path))
    assert report.kind == "jax-npz"
    assert set(report.missing) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head/kernel" in report.dropped and "pre_logits/kernel" in report.dropped
    for name, value in source.state_dict().items():
        if not name.startswith("head"):
            assert torch.allclose(model.state_dict()[name], value, atol=1e-6), name
    model.r = 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), source.forward_features(x), atol=1e-5)


def test_load_official_pyra_checkpoint_gives_same_logits(tmp_path):
    trained = tiny(peft="lora", merging=[8, 6, 4, 2], pyra=True)
    randomize_trainable(trained)
    renames = [(".attn.qkv.lora_down.", ".attn.LoRA_a."), (".attn.qkv.lora_up.", ".attn.LoRA_b."),
               (".reduction.pyra.to_channel_weight", ".pyra_a"), (".reduction.pyra.to_token_weight", ".pyra_b"),
               (".reduction.pyra.norm.", ".pyra_norm.")]
    official = {}
    for k, v in trained.state_dict().items():
        for a, b in renames:
            k = k.replace(a, b)
        official["module." + k] = v.clone()
    assert "blocks.0.pyra_a" in {k.removeprefix("module.") for k in official}
    path = tmp_path / "official.pth"
    torch.save({"model": official, "epoch": 99}, path)
    fresh = tiny(peft="lora", merging=[8, 6, 4, 2], pyra=True)
    report = load_checkpoint(fresh, str(path))
    assert report.kind == "official-pyra" and not report.missing and not report.unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(x), fresh(x))


def test_load_official_adapter_names(tmp_path):
    trained = tiny(peft="adapter")
    randomize_trainable(trained)
    sd = {k.replace(".adapter.down.", ".adapter.ln1.").replace(".adapter.up.", ".adapter.ln2."): v
          for k, v in trained.state_dict().items()}
    torch.save(sd, tmp_path / "a.pth")
    fresh = tiny(peft="adapter")
    assert not load_checkpoint(fresh, str(tmp_path / "a.pth")).missing
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(x), fresh(x))


def test_load_pretrained_pth_formats(tmp_path):
    source = tiny(peft="none")
    sd = {k: v for k, v in source.state_dict().items()}
    sd_1k = dict(sd, **{"head.weight": torch.zeros(1000, 48), "head.bias": torch.zeros(1000)})
    torch.save({"model": sd_1k}, tmp_path / "deit.pth")                                     # DeiT/MAE layout
    torch.save({"state_dict": {"module.base_encoder." + k: v for k, v in sd_1k.items()}
                | {"module.momentum_encoder.cls_token": sd["cls_token"]}}, tmp_path / "moco.pth")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd_1k.items()}, tmp_path / "w.safetensors")
    for name in ("deit.pth", "moco.pth", "w.safetensors"):
        model = tiny(peft="lora")
        with torch.no_grad():
            model.pos_embed.zero_()
        report = load_checkpoint(model, str(tmp_path / name))
        assert report.kind == "pretrained" and "head.weight" in report.dropped, name
        assert not report.unexpected, (name, report.unexpected)
        assert torch.equal(model.pos_embed, source.pos_embed), name
        assert all(".lora_" in k or k.startswith("head") for k in report.missing), name


def test_load_mae_maps_norm_to_fc_norm(tmp_path):
    src = tiny(peft="none")
    sd = dict(src.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 48)
    sd["decoder_embed.weight"] = torch.zeros(8, 48)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    torch.manual_seed(0)
    model = create_model("vit", num_classes=10, global_pool="avg", **TINY)
    report = load_checkpoint(model, str(tmp_path / "mae.pth"))
    assert torch.equal(model.fc_norm.weight, src.norm.weight)
    assert "mask_token" in report.dropped and "decoder_embed.weight" in report.dropped


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    trained = tiny(peft="lora", merging=[8, 6, 4, 2], pyra=True, num_classes=7)
    torch.save({"format": "pyra-checkpoint", "model": trained.state_dict()}, tmp_path / "own.pth")
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(7, 48\) vs model \(10, 48\)"):
        load_checkpoint(tiny(peft="lora", merging=[8, 6, 4, 2], pyra=True), str(tmp_path / "own.pth"))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(tiny(), str(path))
    assert not marker.exists()

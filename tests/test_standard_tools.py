"""The field's own tools see the real model: fvcore and FlopCounterMode give the official counts, the merge
equals an independent ToMe reference, timm's API, ``torch.compile`` and ``torch.export`` work on a
merged PYRA model, and the defects found in review stay fixed."""
import argparse
import math
import warnings

import pytest
import timm
import timm.layers.config as timm_config
import torch
from fvcore.nn import FlopCountAnalysis
from timm.scheduler import CosineLRScheduler
from torch.utils.flop_counter import FlopCounterMode

from lib.benchmark import count_flops
from models import bipartite_soft_matching, create_model, fold_lora, load_checkpoint, merge_source, merge_wavg

VIT_B = "vit_base_patch16_224_in21k"
# Official model (ViT-B/16, LoRA 8, 100 classes), fvcore multiply-adds for one 224² image.
OFFICIAL_TOTAL = {"plain": 17.640e9, "tome_high": 5.098e9, "pyra_high": 5.099e9}
OFFICIAL_LINEAR = {"plain": 16.790e9, "tome_high": 4.826e9, "pyra_high": 4.826e9}
SETTINGS = {"plain": dict(merging=None), "tome_high": dict(merging="high"),
            "pyra_high": dict(merging="high", pyra=True)}


@pytest.fixture
def explicit_attention():
    """timm's documented switch: attention built after this runs the explicit softmax."""
    saved = timm_config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    yield
    timm_config._USE_FUSED_ATTN = saved


def vit_b(setting):
    torch.manual_seed(0)
    return create_model(VIT_B, num_classes=100, **SETTINGS[setting]).eval()


def fvcore_analysis(model):
    analysis = FlopCountAnalysis(model, torch.rand(1, 3, 224, 224))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis.total()
    return analysis


def close(value, expected, rel):
    return abs(value - expected) <= rel * expected


# --- FLOP counters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["plain", "pyra_high"])
def test_plain_fvcore_sees_every_linear(setting):
    model = vit_b(setting)
    assert {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)} == {
        "Linear", "LoRALinear", "LoRAProjection"}
    by_op = fvcore_analysis(model).by_operator()
    # LoRA's frozen qkv product is one addmm accumulating onto bias + update (models.peft): fvcore names it
    # addmm, every other linear layer linear, and together they are the official linear count.
    tokens = [197] * 12 if setting == "plain" else [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8]
    assert by_op["addmm"] == sum(n * 768 * 3 * 768 for n in tokens), by_op["addmm"]
    linear = by_op["linear"] + by_op["addmm"]
    assert close(linear, OFFICIAL_LINEAR[setting], 0.005), linear


@pytest.mark.parametrize("setting", ["plain", "tome_high", "pyra_high"])
def test_explicit_attention_gives_official_totals_with_both_counters(setting, explicit_attention):
    model = vit_b(setting)
    assert not model.blocks[0].attn.fused_attn
    fvcore_total = fvcore_analysis(model).total()
    assert close(fvcore_total, OFFICIAL_TOTAL[setting], 0.005), fvcore_total
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 224, 224))
    # FlopCounterMode counts a multiply-add as two FLOPs (and does not count LayerNorm).
    assert close(counter.get_total_flops(), 2 * OFFICIAL_TOTAL[setting], 0.01), counter.get_total_flops()


def test_fused_attention_is_what_counters_miss_and_count_flops_adds():
    model = vit_b("pyra_high")
    by_op = fvcore_analysis(model).by_operator()
    assert "scaled_dot_product_attention" not in by_op          # the CPU fused kernel: not counted
    assert close(count_flops(model), OFFICIAL_TOTAL["pyra_high"], 0.005)


# --- the merge against an independent ToMe reference -----------------------------------------------------

def reference_merge(metric, r, x, mode, class_token, distill_token, pyra=None):
    """ToMe's published bipartite soft matching, written out again: gather + scatter_reduce."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src_a, keep_a = order[:, :r], order[:, r:]
    if class_token:
        keep_a = keep_a.sort(dim=-1).values
    dst_b = best_b.gather(1, src_a)
    xa, xb = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    kept = torch.gather(xa, 1, keep_a[..., None].expand(-1, -1, c))
    sources = torch.gather(xa, 1, src_a[..., None].expand(-1, -1, c))
    if pyra is not None:
        sources = pyra(sources, torch.gather(xb, 1, dst_b[..., None].expand(-1, -1, c)))
    xb = xb.scatter_reduce(1, dst_b[..., None].expand(-1, -1, c), sources, reduce=mode)
    if distill_token:
        return torch.cat([kept[:, :1], xb[:, :1], kept[:, 1:], xb[:, 1:]], dim=1)
    return torch.cat([kept, xb], dim=1)


@pytest.mark.parametrize("mode", ["sum", "mean", "amax"])
@pytest.mark.parametrize("tokens", [("none", False, False), ("cls", True, False), ("cls+dist", True, True)])
@pytest.mark.parametrize("n", [17, 18])
def test_merge_equals_tome_reference(mode, tokens, n):
    _, class_token, distill_token = tokens
    g = torch.Generator().manual_seed(n)
    metric, x = torch.randn(3, n, 16, generator=g), torch.randn(3, n, 24, generator=g)
    size = torch.randint(1, 5, (3, n, 1), generator=g).float()
    source = torch.eye(n)[None].expand(3, n, n)
    merge, _ = bipartite_soft_matching(metric, 6, class_token, distill_token)
    for tensor in (x, size, source):
        expected = reference_merge(metric, 6, tensor, mode, class_token, distill_token)
        assert torch.allclose(merge(tensor, mode=mode), expected, atol=1e-6, rtol=0)
    # The project's wavg, source tracking and PYRA hook against the reference built from the same pieces.
    def pyra(src, dst):
        return src * torch.sigmoid(dst)
    merged, merged_size = merge_wavg(merge, x, size, pyra=pyra)
    ref_size = reference_merge(metric, 6, size, "sum", class_token, distill_token)
    ref_x = reference_merge(metric, 6, x * size, "sum", class_token, distill_token, pyra=pyra) / ref_size
    assert torch.allclose(merged_size, ref_size, atol=1e-6) and torch.allclose(merged, ref_x, atol=1e-6)
    assert torch.equal(merge_source(merge, x, source),
                       reference_merge(metric, 6, source, "amax", class_token, distill_token))


# --- timm's API on a patched model -----------------------------------------------------------------------

def tiny_pyra(**kwargs):
    torch.manual_seed(0)
    args = dict(num_classes=10, embed_dim=32, depth=3, num_heads=2, patch_size=4, img_size=16,
                merging=[4, 3, 2], pyra=True, peft_dropout=0.0, drop_path_rate=0.0)
    args.update(kwargs)
    model = create_model("vit", **args)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)   # PYRA off its identity init
    return model


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_feature_api_on_merged_tokens(global_pool):
    model = tiny_pyra(global_pool=global_pool).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        tokens, size, _ = model.forward_tokens(x)
        assert torch.equal(model.forward_features(x), tokens) and tokens.shape == (2, 17 - 9, 32)
        assert torch.allclose(model.forward_head(tokens, size=size), logits)
        if global_pool == "token":
            assert torch.allclose(model.forward_head(model.forward_features(x)), logits)
            assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
        else:
            with pytest.raises(ValueError, match="forward_tokens"):
                model.forward_head(tokens)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        assert torch.equal(final, tokens) and [t.shape[1] for t in inter] == [12, 9, 7]
        layers = model.get_intermediate_layers(x, n=2)
        assert [t.shape[1] for t in layers] == [9, 7]
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.forward_intermediates(x)
        with pytest.raises(ValueError, match="reshape=False"):
            model.get_intermediate_layers(x, reshape=True)
        model.r = 0
        assert model.forward_intermediates(x, intermediates_only=True)[0].shape == (2, 32, 4, 4)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.head.weight.requires_grad


def test_grad_checkpointing_gives_the_same_gradients():
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    grads = []
    for enable in (False, True):
        model = tiny_pyra().train()
        model.set_grad_checkpointing(enable)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_torch_compile_forward_and_backward_match_eager():
    model = tiny_pyra().train()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    eager = model(x)
    eager.sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert all(torch.allclose(compiled_grads[n], p.grad, atol=1e-5)
               for n, p in model.named_parameters() if p.requires_grad)


def test_torch_export_of_folded_merged_pyra_model():
    model = fold_lora(tiny_pyra().eval())
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-6)
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())


# --- defects found in review -----------------------------------------------------------------------------

def test_mae_with_global_pool_from_config():
    model = create_model("mae_vit_base_patch16", num_classes=3, global_pool="avg", peft="none")
    assert model.global_pool == "avg"
    assert create_model("mae_vit_base_patch16", num_classes=3, global_pool="token", peft="none").global_pool == "token"


def test_official_training_checkpoint_with_argparse_namespace_loads(tmp_path):
    """Written the way the official PYRA/NOAH training loop saves (``utils.save_on_master``)."""
    model = tiny_pyra(depth=3).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=100)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = argparse.Namespace(data_set="cifar100", epochs=100, lr=1e-3, seed=0, output_dir="outputs/x")
    renames = [(".attn.qkv.lora_down.", ".attn.LoRA_a."), (".attn.qkv.lora_up.", ".attn.LoRA_b."),
               (".reduction.pyra.to_channel_weight", ".pyra_a"), (".reduction.pyra.to_token_weight", ".pyra_b"),
               (".reduction.pyra.norm.", ".pyra_norm.")]
    official = {}
    for k, v in model.state_dict().items():   # the official module names
        for a, b in renames:
            k = k.replace(a, b)
        official[k] = v
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": official, "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 99, "scaler": scaler.state_dict(),
                "args": args}, path)
    fresh = tiny_pyra(depth=3).eval()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    report = load_checkpoint(fresh, str(path))
    assert report.kind == "official-pyra" and not report.missing and not report.unexpected
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def _ddp_two_steps(rank, world, port, result):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the schedule is clamped to the 17 tokens of a 64 px input
            model = create_model("vit", num_classes=4, embed_dim=32, depth=12, num_heads=2, patch_size=16,
                                 img_size=64, merging="high", pyra=True)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(rank)
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(ddp(torch.randn(2, 3, 64, 64)), torch.randint(0, 4, (2,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        result[rank] = float(loss)
    finally:
        dist.destroy_process_group()


def test_ddp_with_schedule_clamped_to_zero_trains(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_ddp_two_steps, args=(2, port, result), nprocs=2, join=True)
    assert len(result) == 2 and all(math.isfinite(v) for v in result.values())


def test_clamped_schedule_is_resolved_at_build_with_a_warning():
    with pytest.warns(UserWarning, match=r"per layer it becomes \[8, 4, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0\]"):
        model = create_model("vit", num_classes=4, embed_dim=32, depth=12, num_heads=2, patch_size=16,
                             img_size=64, merging="high", pyra=True)
    assert model.r == [8, 4, 2, 1] + [0] * 8
    assert [b.reduction.pyra is not None for b in model.blocks] == [True] * 4 + [False] * 8

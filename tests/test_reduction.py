"""The token-reduction seam and PYRA's variants: every variant against its formula written out by hand
(values and gradients), identity at initialisation, gradients only where they belong, a method defined in
this file selected from YAML and trained end to end with no change to the block, the ablation configs,
and checkpoints with PYRA's earlier parameter names (resume from them: tests/test_pipeline.py)."""
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib.build import build_model
from lib.config import ConfigError, load_config
from models import create_model, load_checkpoint, param_categories, param_report
from models.backbones import ABLATION_SETTINGS
from models.pyra import PYRA_ACTIVATIONS, PYRA_GENERATORS, PYRA_WEIGHTS, PYRAVariant, build_pyra, parse_pyra
from models.reduction import REDUCTION_METHODS, TokenReduction, register_reduction

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [PYRAVariant(w, a, g) for g, w, a in itertools.product(PYRA_GENERATORS, PYRA_WEIGHTS, PYRA_ACTIVATIONS)]
IDS = [f"{v.generator}-{v.weights}-{v.activation}" for v in VARIANTS]


# --- a reduction method of this file: prune the r tokens the class token attends to least -----------------

@dataclass(frozen=True)
class PruneOptions:
    keep_order: bool = True


@register_reduction("test_cls_prune")
class ClassAttentionPrune(TokenReduction):
    """Keeps the protected tokens and the unprotected ones with the highest class attention (EViT without
    the fused token): a method that needs something else than ToMe's metric."""

    needs = frozenset({"cls_attn"})
    Options = PruneOptions

    def forward(self, x, size, source, *, trace_source=False, cls_attn=None):
        p, r = self.protected, self.effective_r(x.shape[1])
        keep = cls_attn[:, p:].topk(x.shape[1] - p - r, dim=-1).indices + p
        if self.options.keep_order:
            keep = keep.sort(dim=-1).values
        keep = torch.cat([torch.arange(p).expand(x.shape[0], p), keep], dim=1)

        def take(t):
            return t.gather(1, keep[..., None].expand(-1, -1, t.shape[-1]))
        size = torch.ones_like(x[..., :1]) if size is None else size
        return take(x), take(size), (take(source) if source is not None else None)


def tiny(**kw):
    args = dict(num_classes=10, img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, peft="lora", peft_dim=4)
    args.update(kw)
    return create_model("vit", **args).eval()


def hand_reactivation(module, variant, src, dst):
    """The variants' formulas (models/README.md), written out with explicit sums over pairs and channels."""
    act = (lambda d: 2 * torch.sigmoid(d) - 1) if variant.activation == "sigmoid" else (lambda d: d)
    r, D = src.shape[1], src.shape[2]
    if variant.generator == "static":
        S = module.static_weight
        g = act(S[:r] if variant.weights != "channel" else S)
        return src + src * g
    norm = module.norm
    m = F.layer_norm(src + dst, (D,), norm.weight, norm.bias, 1e-5)
    if variant.generator == "gated_mlp":
        value, gate = (torch.einsum("bid,hd->bih", m, lin.weight) for lin in (module.value, module.gate))
        h = value * F.silu(gate)
        if variant.weights == "channel":
            h = h.mean(1, keepdim=True)
        return src + src * act(torch.einsum("bih,oh->bio", h, module.to_weight.weight))
    out = torch.empty_like(src)
    for b, i in itertools.product(range(src.shape[0]), range(r)):
        w_r = module.to_channel_weight
        delta_d = sum(w_r[j, 0] * m[b, j] for j in range(r)) if variant.weights != "token" else None
        delta_r = (m[b, i] * module.to_token_weight[0]).sum() if variant.weights != "channel" else None
        if variant.weights == "both":
            channel = 2 * torch.sigmoid(delta_d) if variant.activation == "sigmoid" else delta_d
            out[b, i] = src[b, i] + src[b, i] * channel * act(delta_r)
        else:
            out[b, i] = src[b, i] + src[b, i] * act(delta_d if variant.weights == "channel" else delta_r)
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_each_variant_matches_its_formula_in_values_and_gradients(variant):
    torch.manual_seed(0)
    module = build_pyra(variant, r=5, dim=16, layer=3)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    src = torch.randn(2, 3, 16, requires_grad=True)        # 3 < 5 rows: a clamped merge
    dst = torch.randn(2, 3, 16, requires_grad=True)
    out, ref = module(src, dst), hand_reactivation(module, variant, src, dst)
    assert torch.allclose(out, ref, atol=1e-5)
    weight = torch.randn_like(out)
    params = [src, dst, *module.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    refs = torch.autograd.grad((ref * weight).sum(), params, allow_unused=True)
    names = ["src", "dst", *(n for n, _ in module.named_parameters())]
    for name, g, gr in zip(names, grads, refs):
        if variant.generator == "static" and name == "dst":
            assert g is None and gr is None                 # a static weight never looks at the tokens
            continue
        assert g is not None and torch.allclose(g, gr, atol=1e-4), name
        if name.startswith("static_weight") and variant.weights != "channel":
            assert g[3:].abs().sum() == 0 and g[:3].abs().sum() > 0   # rows of pairs that did not occur
        else:
            assert g.abs().sum() > 0, name


def test_variant_parameters_are_named_by_what_they_produce():
    shapes = {v: {n: tuple(p.shape) for n, p in build_pyra(v, r=5, dim=16).named_parameters()} for v in VARIANTS}
    assert shapes[PYRAVariant()] == {"to_channel_weight": (5, 1), "to_token_weight": (1, 16),
                                     "norm.weight": (16,), "norm.bias": (16,)}
    assert shapes[PYRAVariant("channel")] == {"to_channel_weight": (5, 1), "norm.weight": (16,), "norm.bias": (16,)}
    assert shapes[PYRAVariant("token")] == {"to_token_weight": (1, 16), "norm.weight": (16,), "norm.bias": (16,)}
    assert shapes[PYRAVariant(generator="static")] == {"static_weight": (5, 16)}
    assert shapes[PYRAVariant("channel", generator="static")] == {"static_weight": (1, 16)}
    assert shapes[PYRAVariant("token", generator="static")] == {"static_weight": (5, 1)}
    assert shapes[PYRAVariant(generator="gated_mlp")] == {"norm.weight": (16,), "norm.bias": (16,), "value.weight": (
        8, 16), "gate.weight": (8, 16), "to_weight.weight": (16, 8)}
    assert shapes[PYRAVariant("token", generator="gated_mlp")]["to_weight.weight"] == (1, 8)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_every_variant_is_plain_tome_at_initialisation(variant):
    torch.manual_seed(0)
    plain = tiny(merging=[8, 6, 4, 2])
    torch.manual_seed(1)
    with_variant = tiny(merging=[8, 6, 4, 2], pyra=variant)
    report = with_variant.load_state_dict(plain.state_dict(), strict=False)
    assert not report.unexpected_keys and all(".reduction.pyra." in k for k in report.missing_keys)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), with_variant(x))


@pytest.mark.parametrize("variant", [PYRAVariant("token"), PYRAVariant("channel", "none"),
                                     PYRAVariant(generator="static"), PYRAVariant(generator="gated_mlp")], ids=str)
def test_gradients_reach_exactly_the_variants_parameters(variant):
    torch.manual_seed(0)
    model = tiny(merging=[8, 6, 4, 2], pyra=variant).train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, 0, 0.2)
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    categories = param_categories(model)
    expected = {n for b in range(3) for n, _ in model.blocks[b].reduction.pyra.named_parameters(
        prefix=f"blocks.{b}.reduction.pyra")}
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # The last block's merged tokens never reach the class token again: its PYRA has no effect on the logits.
    assert {n for n in reached if categories[n] == "pyra"} == expected
    assert {categories[n] for n in reached} == {"lora", "pyra", "head"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, c in categories.items() if c != "backbone"}


def test_parameters_train_by_module_type_not_by_name():
    from models import mark_trainable
    model = tiny(merging=[8, 6, 4, 2])
    model.blocks[0].anything = build_pyra(True, 8, 32)             # a re-activation under a name of no convention
    model.blocks[1].norm_helper = torch.nn.Linear(4, 4)          # an undeclared module: part of the backbone
    mark_trainable(model, "lora")
    params = dict(model.named_parameters())
    assert all(params[f"blocks.0.anything.{n}"].requires_grad for n, _ in model.blocks[0].anything.named_parameters())
    assert param_categories(model)["blocks.0.anything.to_token_weight"] == "pyra"
    assert not params["blocks.1.norm_helper.weight"].requires_grad


def test_pyra_counts_of_each_variant_vit_b_high():
    counts = {}
    for name, overrides in ABLATION_SETTINGS.items():
        with torch.device("meta"):                                  # shapes only: no memory, no init time
            model = create_model("vit_base_patch16_224_in21k", num_classes=100, merging="high",
                                 pyra=overrides["merging.pyra"])
        counts[name] = param_report(model)["pyra"][1]
    r_sum, D, layers = 192, 768, 12                                # Σ r_l of "high"; all 12 layers merge
    assert counts["tome"] == 0
    assert counts["pyra"] == counts["both_noact"] == 27840 == r_sum + layers * D + 2 * layers * D
    assert counts["channel_sigmoid"] == counts["channel_noact"] == r_sum + 2 * layers * D
    assert counts["token_sigmoid"] == counts["token_noact"] == layers * D + 2 * layers * D
    assert counts["static_matrix"] == r_sum * D
    assert counts["gated_mlp"] == layers * (3 * 8 * D + 2 * D)


# --- configuration ----------------------------------------------------------------------------------------

def test_parse_pyra_forms_and_errors():
    assert parse_pyra(False) is None and parse_pyra(None) is None
    assert parse_pyra(True) == PYRAVariant("both", "sigmoid", "adaptive") == parse_pyra({})
    assert parse_pyra({"weights": "token"}) == PYRAVariant("token", "sigmoid", "adaptive")
    with pytest.raises(ValueError, match=r"merging\.pyra\.weight: unknown key; expected weights, activation"):
        parse_pyra({"weight": "token"})
    with pytest.raises(ValueError, match=r"merging\.pyra\.generator: expected one of adaptive, static, gated_mlp"):
        parse_pyra({"generator": "mlp"})


def test_config_errors_name_the_key(tmp_path):
    base = str(REPO / "configs/vit_b16/ablation/token_sigmoid.yaml")
    with pytest.raises(ConfigError, match=r"merging\.method: expected one of .*tome.*; got 'tofu2'"):
        load_config(base, ["merging.method=tofu2"])
    with pytest.raises(ConfigError, match=r"merging\.pyra\.activation: expected one of sigmoid, none; got 'relu'"):
        load_config(base, ["merging.pyra={weights: token, activation: relu}"])
    with pytest.raises(ConfigError, match=r"merging\.tome\.k: unknown key of method 'tome'; expected none"):
        load_config(base, ["merging.tome={k: 1}"])
    with pytest.raises(ConfigError, match=r"merging\.pyra: PYRA needs token merging"):
        load_config(base, ["merging.r=null"])


def test_ablation_configs_build_their_rows():
    assert sorted(p.stem for p in (REPO / "configs/vit_b16/ablation").glob("*.yaml")) == sorted(ABLATION_SETTINGS)
    for name, overrides in ABLATION_SETTINGS.items():
        cfg = load_config(str(REPO / f"configs/vit_b16/ablation/{name}.yaml"))
        assert cfg.merging.r == "high" and cfg.peft.type == "lora" and cfg.model.name == "vit_base_patch16_224_in21k"
        assert parse_pyra(cfg.merging.pyra) == parse_pyra(overrides["merging.pyra"])
        assert cfg.experiment == f"vit_b16/ablation/{name}"
    cfg = load_config(str(REPO / "configs/vit_b16/ablation/gated_mlp.yaml"), ["model.pretrained="])
    model = build_model(cfg, 10)
    assert type(model.blocks[0].reduction.pyra).__name__ == "GatedMLPReactivation"


# --- the seam ----------------------------------------------------------------------------------------------

def test_registered_method_runs_in_the_block_with_exact_counts():
    assert REDUCTION_METHODS["test_cls_prune"] is ClassAttentionPrune
    model = tiny(merging=[10, 10, 10, 10], method="test_cls_prune", method_options={"keep_order": False})
    assert all(type(b.reduction) is ClassAttentionPrune and not b.reduction.options.keep_order for b in model.blocks)
    assert model.r == [10, 10, 10, 10]                              # pruning is clamped by 64 tokens, not by half
    counts = []
    for b in model.blocks:
        b.register_forward_hook(lambda m, i, o: counts.append(o[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert counts == [55, 45, 35, 25]
    with pytest.raises(ValueError, match="merging.pyra: method ClassAttentionPrune does not merge"):
        tiny(merging=[4] * 4, method="test_cls_prune", pyra=True)
    with pytest.raises(ValueError, match="unknown merging method 'nope'; expected one of: .*test_cls_prune.*tome"):
        tiny(merging=[4] * 4, method="nope")


def test_class_attention_handed_to_methods_is_the_class_tokens_softmax():
    model = tiny(merging=[4, 4, 4, 4], method="test_cls_prune")
    attn, x = model.blocks[0].attn, torch.randn(2, 9, 32)
    size = torch.rand(2, 9, 1) + 0.5
    _, extra = attn(x, size, outputs=frozenset({"cls_attn", "metric"}))
    q, k, _ = attn.qkv(x).reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = (q[:, :, 0:1] @ k.transpose(-1, -2))[:, :, 0] * 8 ** -0.5 + size[..., 0].log()[:, None]
    assert torch.allclose(extra["cls_attn"], logits.softmax(-1).mean(1), atol=1e-6)
    assert torch.allclose(extra["metric"], k.mean(1), atol=1e-6)


def test_method_of_this_file_selected_from_yaml_trains_end_to_end(digits_root, tmp_path):
    """train.py with ``merging.method: test_cls_prune`` from a YAML file; the method is registered by importing
    this test module first, with no change to the block or to any file of the project."""
    config = tmp_path / "prune.yaml"
    config.write_text(f"_base_: [{REPO / 'configs/demo/digits_random.yaml'}]\n"
                      "merging:\n  method: test_cls_prune\n  r: [4, 2]\n  pyra: false\n"
                      "  test_cls_prune: {keep_order: true}\n")
    args = ["--config", str(config), f"data.root={digits_root}", "data.task=digits", f"output_dir={tmp_path}",
            "experiment=t", "model.name=vit", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
            "model.depth=2", "model.num_heads=2", "peft.type=full", "data.num_workers=0", "train.batch_size=20",
            "train.epochs=6", "train.eval_interval=1", "optim.lr=2e-3", "sched.warmup_epochs=1",
            "report.benchmark_batch=8", "report.benchmark_seconds=0.05"]
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_reduction, train; "
            "sys.exit(train.main(sys.argv[3:]))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(REPO), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "t" / "digits" / "seed0"
    assert json.loads((run / "efficiency.json").read_text())["tokens_per_layer"] == [17, 13, 11]
    assert load_config(run / "config.yaml").merging.method == "test_cls_prune"
    rows = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert rows[-1]["test_acc1"] > 30 and rows[-1]["train_loss"] < rows[0]["train_loss"], rows   # chance: 10 %


# --- earlier parameter names -----------------------------------------------------------------------------

EARLIER = [(".reduction.pyra.to_channel_weight", ".pyra.weight_r"),
           (".reduction.pyra.to_token_weight", ".pyra.weight_d"), (".reduction.pyra.norm.", ".pyra.norm.")]


def _earlier_names(state_dict):
    out = {}
    for k, v in state_dict.items():
        for new, old in EARLIER:
            k = k.replace(new, old)
        out[k] = v
    return out


def test_run_checkpoint_with_earlier_pyra_names_loads_exactly(tmp_path):
    from lib.checkpointing import save_run_checkpoint
    from models import trainable_state_dict
    torch.manual_seed(0)
    trained = tiny(merging=[8, 6, 4, 2], pyra=True)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    old = _earlier_names(trainable_state_dict(trained))
    assert "blocks.0.pyra.weight_r" in old
    save_run_checkpoint(tmp_path / "best.pth", model=old, next_epoch=3)
    torch.manual_seed(0)                                            # the same (frozen) backbone
    fresh = tiny(merging=[8, 6, 4, 2], pyra=True)
    report = load_checkpoint(fresh, str(tmp_path / "best.pth"))
    categories = param_categories(fresh)
    assert not report.unexpected and {categories[k] for k in report.missing} == {"backbone"}
    assert report.loaded == len(old)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_merging_block_is_a_timm_block_fn():
    from timm.models.vision_transformer import VisionTransformer

    from models.vit import MergingAttention, MergingBlock, apply_patch
    torch.manual_seed(0)
    built = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                              block_fn=MergingBlock)
    assert all(type(b.attn) is MergingAttention and type(b.reduction).__name__ == "ToMe" for b in built.blocks)
    torch.manual_seed(0)
    patched = apply_patch(VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                            num_classes=3))
    patched.load_state_dict(built.state_dict())
    apply_patch(built)
    built.r = patched.r = 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), patched.eval()(x))


def test_matching_scores_are_fp32_under_bf16_autocast():
    """Near-equal keys tie in bf16 (scores 0.9922 / 0.9961 / 1.0): the matching must rank them in fp32."""
    from models.tome import bipartite_soft_matching
    torch.manual_seed(0)
    metric = (torch.randn(1, 1, 64) + 0.02 * torch.randn(2, 101, 64)).bfloat16()
    x = torch.randn(2, 101, 64)

    def merged(m, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            merge, _ = bipartite_soft_matching(m, 30)
        return merge(x, mode="sum")
    assert torch.equal(merged(metric, True), merged(metric.float(), False))

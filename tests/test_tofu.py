"""ToFu (models/tofu.py) against the paper's definitions: MLERP on hand-computed vectors, pruning layers that drop
their sources exactly, merging layers that use MLERP, the prune→merge switch, token counts per layer, protected
tokens, composition with LoRA / Adapter / prompts / PYRA, torch.compile and torch.export, the configs at ToMe's
fvcore FLOPs, config errors naming the key, and the demo pipeline from YAML."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

from lib.benchmark import count_flops, tokens_per_layer
from lib.build import build_model
from lib.config import ConfigError, load_config
from models import apply_patch, create_model, fold_lora, param_categories, set_reduction
from models.backbones import REDUCTION_SETTINGS, SCHEDULES
from models.reduction import check_options
from models.tofu import ToFu, ToFuOptions, mlerp, mlerp_merge
from models.tome import ToMe, bipartite_soft_matching, merge_wavg

REPO = Path(__file__).resolve().parents[1]


def tofu_layer(layer, depth=2, r=2, protected=1, **options):
    return ToFu(r, protected=protected, layer=layer, depth=depth, options=ToFuOptions(**options))


def tiny(merging, depth=4, grid=8, **kwargs):
    """A custom ViT on a ``grid``×``grid`` patch grid (patch 4), width 16 with 2 heads and LoRA 2 by default."""
    kwargs = {"peft": "lora", "peft_dim": 2, "embed_dim": 16, "num_heads": 2, **kwargs}
    return create_model("vit", num_classes=5, depth=depth, patch_size=4, img_size=4 * grid, method="tofu",
                        merging=merging, **kwargs)


def slerp(a, b, t):
    """SLERP of two vectors of the same norm (the special case MLERP extends)."""
    omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


# A layer's input with known matches (protected class token at 0; set A = even, B = odd positions): with r = 2,
# source 2 goes to destination 1 and source 4 to destination 5; 6 and 8 stay. Output: [0, 6, 8, 1', 3, 5', 7].
E = torch.eye(4)
METRIC = torch.stack([E[0] + E[1] + E[2] + E[3], E[0], E[0] + 0.01 * E[1], E[2], E[1] + 0.02 * E[0], E[1],
                      E[2] + E[3], E[3], -(E[0] + E[1] + E[2] + E[3])])[None]
X = torch.tensor([[0.5, 0.5], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0], [1.0, 0.0], [3.0, 0.0], [2.0, -1.0], [0.0, 2.0],
                  [-1.0, 1.0]])[None]


# --- MLERP as the paper defines it ------------------------------------------------------------------------

def test_mlerp_on_hand_computed_vectors():
    # (3, 0) and (0, 4): the mean (1.5, 2) has norm 2.5; MLERP stretches it to the larger norm, 4
    torch.testing.assert_close(mlerp(torch.tensor([[3.0, 0.0], [0.0, 4.0]])), torch.tensor([2.4, 3.2]))
    # equal norms, parallel: the plain average (the vector itself); parallel, unequal norms: the longer one
    torch.testing.assert_close(mlerp(torch.tensor([[1.0, 2.0], [1.0, 2.0]])), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(mlerp(torch.tensor([[1.0, 0.0], [3.0, 0.0]])), torch.tensor([3.0, 0.0]))
    # equal norms, equal weights: SLERP at t = 1/2 (the case MLERP generalises to many tokens)
    torch.testing.assert_close(mlerp(torch.tensor([[1.0, 0.0], [0.0, 1.0]])), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.manual_seed(0)
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    b = b / b.norm() * a.norm()
    torch.testing.assert_close(mlerp(torch.stack([a, b])), slerp(a, b, 0.5))
    # sizes weight the direction: (1, 0) standing for 3 patches, (0, 1) for 1 -> direction (3, 1), norm 1
    torch.testing.assert_close(mlerp(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([3.0, 1.0])),
                               torch.tensor([3.0, 1.0]) / math.sqrt(10))
    # many tokens: the norm is the group's largest, the direction the mean's
    group = torch.randn(5, 6)
    out = mlerp(group)
    torch.testing.assert_close(out.norm(), group.norm(dim=-1).max())
    torch.testing.assert_close(out / out.norm(), group.mean(0) / group.mean(0).norm())


def test_mlerp_merge_applies_mlerp_to_each_matched_group():
    merge, _ = bipartite_soft_matching(METRIC, 2, protected=1)
    size = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0]).view(1, 9, 1)
    out, out_size = mlerp_merge(merge, X, size)
    x = X[0]
    expected = torch.stack([x[0], x[6], x[8], mlerp(x[[1, 2]], torch.tensor([1.0, 2.0])), x[3],
                            mlerp(x[[5, 4]], torch.tensor([1.0, 3.0])), x[7]])
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[0, [0, 1, 2, 4, 6]], expected[[0, 1, 2, 4, 6]])   # untouched tokens: exactly
    assert out_size.flatten().tolist() == [1.0, 1.0, 1.0, 3.0, 1.0, 4.0, 1.0]
    torch.testing.assert_close(out[0, 3].norm(), torch.tensor(4.0))           # max(‖(3, 0)‖, ‖(0, 4)‖)


# --- the layers: prune, then MLERP, switching at merge_from ---------------------------------------------------

def test_prune_layer_drops_the_sources_and_leaves_the_rest_exactly():
    layer = tofu_layer(0)
    assert layer.mode == "prune" and layer.prunes and "pyra" not in layer._modules
    size = torch.tensor([1.0, 2.0, 5.0, 1.0, 7.0, 3.0, 1.0, 1.0, 1.0]).view(1, 9, 1)
    out, out_size, source = layer(X, size, None, trace_source=True, metric=METRIC)
    kept = [0, 6, 8, 1, 3, 5, 7]                                  # sources 2 and 4 are gone
    assert torch.equal(out[0], X[0, kept]) and torch.equal(out_size[0], size[0, kept])
    assert torch.equal(source[0], torch.eye(9)[kept])             # their patches leave the map with them
    out, out_size, _ = layer(X, None, None, metric=METRIC)
    assert torch.equal(out[0], X[0, kept]) and out_size is None   # no size yet: every kept token is one patch


def test_merge_layer_uses_mlerp_and_average_when_asked():
    layer = tofu_layer(1)
    assert layer.mode == "mlerp" and not layer.prunes and "pyra" in layer._modules
    out, size, source = layer(X, None, None, trace_source=True, metric=METRIC)
    merge, _ = bipartite_soft_matching(METRIC, 2, protected=1)
    expected, expected_size = mlerp_merge(merge, X)
    assert torch.equal(out, expected) and torch.equal(size, expected_size)
    torch.testing.assert_close(out[0, 3], mlerp(X[0, [1, 2]]))
    assert source[0, 3].nonzero().flatten().tolist() == [1, 2]
    average = tofu_layer(1, mlerp=False)                          # ToMe's size-weighted average, exactly
    tome = ToMe(2, protected=1)
    assert average.mode == "average"
    for a, b in zip(average(X, None, None, metric=METRIC), tome(X, None, None, metric=METRIC)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_the_switch_layer():
    modes = lambda depth, **o: [tofu_layer(i, depth=depth, **o).mode for i in range(depth)]   # noqa: E731
    assert modes(12) == ["prune"] * 6 + ["mlerp"] * 6            # default: half the depth
    assert modes(24) == ["prune"] * 12 + ["mlerp"] * 12
    assert modes(12, merge_from=3) == ["prune"] * 3 + ["mlerp"] * 9
    assert modes(4, merge_from=0) == ["mlerp"] * 4 and modes(4, merge_from=4) == ["prune"] * 4
    assert modes(4, mlerp=False) == ["prune", "prune", "average", "average"]
    model = tiny([8, 8, 8, 8], method_options={"merge_from": 1})
    assert [b.reduction.mode for b in model.blocks] == ["prune", "mlerp", "mlerp", "mlerp"]


def test_token_counts_per_layer_are_tomes():
    """ToMe's matching and clamp: ToFu at ToMe's low / high schedule keeps ToMe's tokens per layer (ViT-B/16 at
    224 px: 14x14 patches; a narrow model, the counts depend only on the grid and the schedule)."""
    for level in ("low", "high"):
        counts = []
        for method in ("tome", "tofu"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                model = create_model("vit", num_classes=5, depth=12, patch_size=4, img_size=56, embed_dim=8,
                                     num_heads=1, merging=SCHEDULES["vit_base"][level], method=method)
            counts.append(tokens_per_layer(model, 56))
        assert counts[0] == counts[1]
    assert counts[1] == [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]
    with pytest.warns(UserWarning, match=r"per layer it becomes \[32, 8, 8, 8\]"):   # clamp: half the 64 patches
        assert tokens_per_layer(tiny([40, 8, 8, 8]), 32) == [65, 33, 25, 17, 9]


# --- protected tokens and composition ------------------------------------------------------------------------

@pytest.mark.parametrize("protected", [1, 2, 4])
@pytest.mark.parametrize("layer", [0, 1])
def test_protected_tokens_are_never_reduced(protected, layer):
    torch.manual_seed(protected)
    x, metric = torch.randn(2, protected + 16, 6), torch.randn(2, protected + 16, 8)
    metric[:, :protected] = metric[:, protected:protected + 1]    # as similar to a patch as can be
    out, size, source = tofu_layer(layer, r=8, protected=protected)(x, None, None, trace_source=True, metric=metric)
    assert out.shape[1] == protected + 8
    assert torch.equal(out[:, :protected], x[:, :protected])
    assert size is None or torch.equal(size[:, :protected], torch.ones(2, protected, 1))
    assert torch.equal(source[:, :protected], torch.eye(protected + 16)[:protected].expand(2, -1, -1))


def test_prompts_and_distillation_token_are_never_reduced():
    torch.manual_seed(0)
    model = tiny([16, 16, 8, 0], peft="prompt", peft_dim=3, trace_source=True).eval()
    assert model.blocks[0].protected == 4
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.source.shape == (2, 4 + 24, 4 + 64)
    assert torch.equal(model.source[:, :4], torch.eye(68)[:4].expand(2, -1, -1))   # class + prompts hold themselves
    deit = VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    apply_patch(deit, trace_source=True)
    deit.r = [4, 4]
    set_reduction(deit, "tofu")
    assert [b.reduction.mode for b in deit.blocks] == ["prune", "mlerp"]
    assert deit.blocks[0].protected == 2 and tokens_per_layer(deit, 16) == [18, 14, 10]
    with torch.no_grad():
        deit.eval()(torch.randn(1, 3, 16, 16))
    assert torch.equal(deit.source[:, :2], torch.eye(18)[:2][None])               # class and distillation token


def test_lora_adapter_and_prompts_compose():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for peft, category in (("lora", "lora"), ("adapter", "adapter"), ("prompt", "prompt")):
        model = tiny([16, 16, 8, 8], peft=peft).train()
        categories = param_categories(model)
        assert {categories[n] for n, p in model.named_parameters() if p.requires_grad} == {category, "head"}
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    model = tiny([16, 16, 8, 8]).eval()
    with torch.no_grad():
        torch.testing.assert_close(fold_lora(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_pyra_re_activates_in_merge_layers_only():
    torch.manual_seed(0)
    model = tiny([16, 16, 8, 0], pyra=True).train()
    has_pyra = [b.reduction._modules.get("pyra") is not None for b in model.blocks]
    assert has_pyra == [False, False, True, False]                # prune layers 0, 1; layer 3 removes nothing
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    categories = param_categories(model)
    pyra_grads = {n: p.grad for n, p in model.named_parameters() if categories[n] == "pyra"}
    assert pyra_grads and all(g is not None for g in pyra_grads.values())
    assert pyra_grads["blocks.2.reduction.pyra.to_token_weight"].abs().sum() > 0   # W_D: the one not at zero
    model.r = [8, 8, 4, 0]                                        # a new schedule needs no PYRA in prune layers
    with pytest.raises(ValueError, match="every layer of the schedule prunes; PYRA re-activates merged tokens"):
        tiny([16, 16, 0, 0], pyra=True)


def test_eval_model_through_torch_compile_and_export(compiles_and_exports):
    torch.manual_seed(0)
    compiles_and_exports(fold_lora(tiny([16, 16, 8, 8]).eval()), torch.randn(2, 3, 32, 32))


# --- configs and errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("level, tome", [("low", 8_815_507_712), ("high", 5_098_149_376)])
def test_generated_configs_cost_what_tome_costs(level, tome):
    """fvcore multiply-adds of ViT-B/16 + LoRA 8, 100 classes (lib.benchmark.count_flops), against ToMe low / high
    as the same helper counts them (8.816e9, 5.098e9; models/README.md §6). The weights are left uninitialised:
    the count depends on shapes only, and ToFu's matching always removes r tokens."""
    cfg = load_config(REPO / f"configs/vit_b16/lora_tofu_{level}.yaml", ["model.pretrained="])
    setting = REDUCTION_SETTINGS["tofu"][level]
    assert cfg.merging.method == "tofu" and cfg.merging.r == level == setting["merging.r"]
    assert cfg.merging.tofu == setting["merging.tofu"] == {"merge_from": 6, "mlerp": True}
    with torch.device("meta"):                                    # skip the slow random init
        model = build_model(cfg, num_classes=100, pretrained=False)
    model.to_empty(device="cpu")
    assert [b.reduction.mode for b in model.blocks] == ["prune"] * 6 + ["mlerp"] * 6
    flops = count_flops(model)
    assert abs(flops / tome - 1) < 0.05, flops                    # the acceptance bound...
    assert flops == tome                                          # ...and in fact ToMe's count exactly


def test_bad_keys_are_config_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"^merging\.tofu\.merge_at: unknown key of method 'tofu'; "
                                         r"expected merge_from, mlerp$"):
        check_options("tofu", {"merge_at": 4})
    for key, value, expected in (("merge_from", -1, "expected an integer >= 0 .a block index. or null, got -1"),
                                 ("merge_from", True, "expected an integer >= 0 .a block index. or null, got True"),
                                 ("merge_from", 2.5, "expected an integer >= 0 .a block index. or null, got 2.5"),
                                 ("mlerp", 1, "expected true or false, got 1")):
        with pytest.raises(ConfigError, match=rf"merging\.tofu\.{key}: {expected}"):
            load_config(REPO / "configs" / "vit_b16" / "lora_tofu_low.yaml", [f"merging.tofu.{key}={value}"])
    assert check_options("tofu", {"merge_from": None}) == ToFuOptions()
    with pytest.raises(ValueError, match=r"merging\.tofu\.merge_from: expected a block index of the 4-block "
                                         r"model \(0\.\.4; 4 prunes everywhere\), got 5"):
        tiny([8, 8, 8, 8], method_options={"merge_from": 5})


def test_demo_pipeline_trains_one_epoch_with_tofu_from_yaml(train_demo_epoch):
    run = train_demo_epoch(
        "merging:\n  method: tofu\n  r: [4, 4]\n  pyra: false\n"
        "  tofu: {merge_from: 1, mlerp: true}\n")
    assert json.loads((run / "efficiency.json").read_text())["tokens_per_layer"] == [17, 13, 9]
    saved = load_config(run / "config.yaml")
    assert saved.merging.method == "tofu" and saved.merging.r == [4, 4] and saved.merging.tofu["merge_from"] == 1


def test_merge_wavg_unchanged_by_the_prune_mode():
    """The 'prune' mode added to ToMe's merge leaves its other modes as they were."""
    merge, _ = bipartite_soft_matching(METRIC, 2, protected=1)
    out, size = merge_wavg(merge, X)
    torch.testing.assert_close(out[0, 3], (X[0, 1] + X[0, 2]) / 2)
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0, 1.0, 2.0, 1.0]

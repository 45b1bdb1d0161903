"""FPET (models/fpet.py): the step and its straight-through relaxation against the official code's outputs
(tests/data/golden/fpet/), a whole tiny ViT against the official patched one, the checkerboard and the
token counts per layer, protected tokens, composition with LoRA / Adapter, torch.compile and torch.export,
the configs at ToMe's FLOPs, the demo pipeline from YAML, and config errors naming the key."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

from lib.benchmark import tokens_per_layer
from lib.config import ConfigError, load_config
from models import apply_patch, create_model, fold_lora, param_categories, param_report, set_reduction
from models.backbones import REDUCTION_SETTINGS
from models.fpet import FPET, BinaryLinear, FPETOptions, checkerboard_stages, fpet_schedule
from models.reduction import build_reduction, check_options

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "fpet"


def load_golden(name):
    return torch.load(GOLDEN / f"{name}.pt", weights_only=False)


def fpet_layer(grid, head_dim, protected=1, dropout=0.0, **options):
    return FPET(10 ** 6, protected=protected, dim=0, layer=0, grid=grid, head_dim=head_dim,
                options=FPETOptions(refine_dropout=dropout, **options))


def tiny(merging, grid=8, depth=3, **kwargs):
    """A custom ViT with a ``grid``×``grid`` patch grid (patch 4), by default width 16 with 2 heads and LoRA 2."""
    kwargs = {"peft": "lora", "peft_dim": 2, "embed_dim": 16, "num_heads": 2, **kwargs}
    return create_model("vit", num_classes=5, depth=depth, patch_size=4, img_size=4 * grid, method="fpet",
                        merging=merging, **kwargs)


# --- goldens: the official code's outputs -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["step_grid14", "step_grid8_sizes"])
def test_step_and_relaxation_match_the_official_code(name):
    g = load_golden(name)
    grid = g["meta"]["grid"]
    layer = fpet_layer((grid, grid), g["meta"]["in_dim"])
    with torch.no_grad():
        layer.refine.down.weight.copy_(g["weights"]["down"])
        layer.refine.up.weight.copy_(g["weights"]["up"])
    layer.eval()                                                  # the step: hard matching as a scatter
    with torch.no_grad():
        x, size, _ = layer(g["x"], g["size"], None, metric=g["metric"])
    assert x.shape == g["x_out"].shape == (g["x"].shape[0], grid * grid // 2 + 1, g["x"].shape[-1])
    torch.testing.assert_close(x, g["x_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(size, g["size_out"], rtol=0, atol=0)
    layer.train()                                                 # the relaxation: straight-through matrix
    x_in = g["x"].clone().requires_grad_(True)
    x, size, _ = layer(x_in, g["size"], None, metric=g["metric"])
    ((x * g["proj_x"]).sum() + (size * g["proj_size"]).sum()).backward()
    torch.testing.assert_close(x, g["x_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(x_in.grad, g["grad_x"], rtol=1e-5, atol=1e-6)
    for ours, theirs in ((layer.refine.down.weight.grad, g["grad_down"]), (layer.refine.up.weight.grad, g["grad_up"])):
        assert theirs.abs().max() > 1e-3                           # the refinement really learns from the loss
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def official_vit_here():
    g = load_golden("vit")
    s = g["spec"]
    schedule = [0] * s["depth"]
    schedule[g["fpet_layer"]] = s["img_size"] ** 2 // s["patch_size"] ** 2 // 2
    model = create_model("vit", num_classes=s["num_classes"], embed_dim=s["embed_dim"], depth=s["depth"],
                         num_heads=s["num_heads"], patch_size=s["patch_size"], img_size=s["img_size"],
                         mlp_ratio=s["mlp_ratio"], peft="full", merging=schedule, method="fpet",
                         method_options={"refine_dropout": 0.0}, drop_path_rate=0.0)
    rename = {".refinement.adapter_down.": ".reduction.refine.down.",
              ".refinement.adapter_up.": ".reduction.refine.up."}

    def ours(key):
        for theirs, mine in rename.items():
            key = key.replace(theirs, mine)
        return key

    report = model.load_state_dict({ours(k): v for k, v in g["state_dict"].items()})
    assert not report.missing_keys and not report.unexpected_keys
    return model, g, ours


def test_whole_tiny_vit_matches_the_official_patched_model():
    """Same weights as the official ``apply_patch(r_layer=1)`` model: the FPET layer sits where the official one
    does (after block 1's attention), later blocks attend proportionally, the class token is read; eval and
    train-mode logits and gradients agree."""
    model, g, ours = official_vit_here()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(g["images"]), g["eval_logits"], rtol=1e-5, atol=1e-5)
    model.train()
    out = model(g["images"])
    torch.testing.assert_close(out, g["train_logits"], rtol=1e-5, atol=1e-5)
    (out * g["proj"]).sum().backward()
    grads = dict(model.named_parameters())
    assert any(".refinement." in k for k in g["grads"])
    for key, theirs in g["grads"].items():
        ours_grad = grads[ours(key)].grad
        torch.testing.assert_close(ours_grad, theirs, rtol=1e-4, atol=1e-5 * max(theirs.abs().max().item(), 1e-3))


# --- the method as written in models/README.md ------------------------------------------------------------

def test_checkerboard_split_and_its_continuation():
    stages = checkerboard_stages((4, 4))
    # one 4x4 grid: A = black squares (row + col even), B = white ones in the official order
    assert stages[0].a == (0, 2, 8, 10, 5, 7, 13, 15) and stages[0].b == (4, 6, 12, 14, 1, 3, 9, 11)
    assert all((p // 4 + p % 4) % 2 == 0 for p in stages[0].a)
    # the whites form two 2x2 grids, each one's neighbours in the other: the first merges into the second
    assert stages[1].grids == ((2, 2), (2, 2)) and stages[1].a == (0, 1, 2, 3) and stages[1].b == (4, 5, 6, 7)
    assert stages[2].grids == ((2, 2),) and len(stages) == 3       # then a 2x2 grid; one token per half cannot pair
    assert [(len(s.a), len(s.b)) for s in checkerboard_stages((14, 14))] == [
        (98, 98), (49, 49), (25, 24), (12, 12), (6, 6), (4, 2)]
    assert fpet_schedule((14, 14), [3, 6, 9], 12) == REDUCTION_SETTINGS["fpet"]["low"]["merging.r"]
    assert fpet_schedule((14, 14), [0, 3, 7], 12) == REDUCTION_SETTINGS["fpet"]["high"]["merging.r"]


def test_token_counts_per_layer_of_the_configs_schedules():
    """On a 14x14 patch grid (ViT-B/16 at 224 px): each FPET layer keeps the checkerboard's white half; the
    schedule is applied as written (no clamp warning)."""
    for level, counts in (("low", [197] * 4 + [99] * 3 + [50] * 3 + [25] * 3),
                          ("high", [197] + [99] * 3 + [50] * 4 + [25] * 5)):
        schedule = REDUCTION_SETTINGS["fpet"][level]["merging.r"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = tiny(schedule, grid=14, depth=12, embed_dim=8, num_heads=1)
        assert model.r == schedule
        assert tokens_per_layer(model, 56) == counts
        refinements = [b.reduction.refine is not None for b in model.blocks]
        assert refinements == [r > 0 for r in schedule]           # a refinement only where FPET merges


def test_hard_forward_equals_the_relaxation_and_only_the_refinement_learns_the_matching():
    torch.manual_seed(0)
    model = tiny([0, 32, 16], drop_path_rate=0.0, peft_dropout=0.0, method_options={"refine_dropout": 0.0})
    x = torch.randn(2, 3, 32, 32)
    model.train()
    tokens, size, _ = model.forward_tokens(x)
    model.eval()
    with torch.no_grad():
        hard_tokens, hard_size, _ = model.forward_tokens(x)
    torch.testing.assert_close(tokens, hard_tokens, rtol=0, atol=1e-5)
    assert torch.equal(size, hard_size) and tokens.shape[1] == 17
    model.train()
    model.forward_tokens(x)[1].pow(2).sum().backward()            # sizes depend on the matching only
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["blocks.1.reduction.refine.up.weight"].abs().sum() > 0
    assert all(g is None or not g.any() for n, g in grads.items() if ".reduction." not in n)   # keys detached


def test_tied_best_matches_drop_the_token_as_the_official_code():
    """A token whose two best matches score the same has an empty row of the hard matrix: it is not merged
    into either, and the sizes then sum to one patch less (the official behaviour, kept)."""
    layer = fpet_layer((2, 3), 2, protected=0, refine_bits=32)   # up at zero: the refinement adds 0
    assert checkerboard_stages((2, 3))[0].a == (0, 2, 4) and checkerboard_stages((2, 3))[0].b == (3, 5, 1)
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]]])
    x = torch.arange(12.0).view(1, 6, 2)
    for training in (False, True):
        layer.train(training)
        out, size, _ = layer(x, None, None, metric=metric)
        assert size.flatten().tolist() == [1.0, 1.0, 3.0]          # token 0 ties (B 3 and 5): dropped
        torch.testing.assert_close(out[0], torch.stack([x[0, 3], x[0, 5], (x[0, 1] + x[0, 2] + x[0, 4]) / 3]))


def test_binary_refinement_weights():
    torch.manual_seed(0)
    linear = BinaryLinear(6, 4)
    w = linear.weight
    expected = w.mean() + torch.sign(w - w.mean()) * 0.6744897501960817 * w.std()   # ±Φ⁻¹(3/4) standard deviations
    torch.testing.assert_close(linear.binarized_weight(), expected, rtol=1e-5, atol=1e-6)
    (linear.binarized_weight() * torch.arange(24.0).view(4, 6)).sum().backward()
    assert linear.weight.grad.abs().sum() > 0                      # straight through the sign


# --- protected tokens, composition, compile / export ------------------------------------------------------

@pytest.mark.parametrize("protected", [1, 2, 4])
def test_protected_tokens_take_no_part(protected):
    """The leading tokens come out unchanged with size 1, and the rest is exactly FPET without them."""
    torch.manual_seed(1)
    layer = fpet_layer((4, 4), 8, protected=protected)
    plain = fpet_layer((4, 4), 8, protected=0)
    plain.load_state_dict(layer.state_dict())
    x, metric = torch.randn(2, protected + 16, 6), torch.randn(2, protected + 16, 8)
    for training in (False, True):
        layer.train(training)
        plain.train(training)
        out, size, source = layer(x, None, None, trace_source=True, metric=metric)
        rest, rest_size, _ = plain(x[:, protected:], None, None, metric=metric[:, protected:])
        assert torch.equal(out[:, :protected], x[:, :protected]) and torch.equal(size[:, :protected],
                                                                                  torch.ones(2, protected, 1))
        torch.testing.assert_close(out[:, protected:], rest, rtol=0, atol=1e-6)
        assert torch.equal(size[:, protected:], rest_size)
        assert torch.equal(source[:, :protected], torch.eye(protected + 16)[:protected].expand(2, -1, -1))


def test_prompts_and_distillation_token_are_never_merged():
    torch.manual_seed(0)
    model = tiny([32, 16, 0], peft="prompt", peft_dim=3, trace_source=True).eval()
    assert model.blocks[0].protected == 4
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.source.shape == (2, 4 + 16, 4 + 64)
    assert torch.equal(model.source[:, :4], torch.eye(68)[:4].expand(2, -1, -1))   # class + prompts hold themselves
    deit = VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    apply_patch(deit, trace_source=True)
    deit.r = [8, 4]
    set_reduction(deit, "fpet")                                     # built knowing its r, as create_model does
    assert deit.blocks[0].protected == 2 and tokens_per_layer(deit, 16) == [18, 10, 6]
    with torch.no_grad():
        deit.eval()(torch.randn(1, 3, 16, 16))
    assert torch.equal(deit.source[:, :2], torch.eye(18)[:2][None])   # class and distillation token


def test_lora_and_adapter_compose():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for peft, category in (("lora", "lora"), ("adapter", "adapter")):
        model = tiny([32, 16, 0], peft=peft).train()
        categories = param_categories(model)
        trainable = {categories[n] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {category, "reduction", "head"}
        report = param_report(model)
        assert report["reduction"] == (2 * 2 * 8 * 32, 2 * 2 * 8 * 32)   # 2 FPET layers, down + up, 8x32 each
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if p.requires_grad and categories[name] in (category, "reduction"):
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    model = tiny([32, 16, 0]).eval()
    with torch.no_grad():
        unfolded = model(x)
        torch.testing.assert_close(fold_lora(model)(x), unfolded, rtol=1e-5, atol=1e-5)


def test_eval_model_through_torch_compile_and_export(compiles_and_exports):
    torch.manual_seed(0)
    compiles_and_exports(fold_lora(tiny([32, 16, 0]).eval()), torch.randn(2, 3, 32, 32))


# --- configs and errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["low", "high"])
def test_generated_configs_hold_the_settings(level):
    cfg = load_config(REPO / "configs" / "vit_b16" / f"lora_fpet_{level}.yaml")
    setting = REDUCTION_SETTINGS["fpet"][level]
    assert cfg.merging.method == "fpet" and cfg.merging.r == setting["merging.r"]
    assert cfg.merging.fpet == setting["merging.fpet"] and isinstance(cfg.merging.fpet["refine_dropout"],
                                                                              float)
    assert check_options("fpet", cfg.merging.fpet) == FPETOptions()


def test_bad_keys_are_config_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"^merging\.fpet\.refine_dm: unknown key of method 'fpet'; "
                                         r"expected refine_dim, refine_bits, refine_dropout$"):
        check_options("fpet", {"refine_dm": 4})
    for key, value, expected in (("refine_bits", 2, "expected one of 1, 32, got 2"),
                                 ("refine_dim", 0, "expected an integer >= 1, got 0"),
                                 ("refine_dim", True, "expected an integer >= 1, got True"),
                                 ("refine_dropout", 1.0, r"expected a number in \[0, 1\), got 1.0")):
        with pytest.raises(ConfigError, match=rf"merging\.fpet\.{key}: {expected}"):
            load_config(REPO / "configs" / "vit_b16" / "lora_fpet_low.yaml", [f"merging.fpet.{key}={value}"])
    with pytest.raises(ValueError, match=r"merging\.r: layer 0 asks FPET to merge 16 tokens, but an FPET layer "
                                         r"merges the whole checkerboard half of its 64 patch tokens: set r to 32"):
        tiny([16, 0, 0])
    with pytest.raises(ValueError, match="'fpet' is built knowing the model's grid, head_dim"):
        build_reduction("fpet", 32, 1, 16)


def test_demo_pipeline_trains_one_epoch_with_fpet_from_yaml(train_demo_epoch):
    run = train_demo_epoch(
        "merging:\n  method: fpet\n  r: [8, 4]\n  pyra: false\n"
        "  fpet: {refine_dim: 8, refine_bits: 1, refine_dropout: 0.1}\n")
    assert json.loads((run / "efficiency.json").read_text())["tokens_per_layer"] == [17, 9, 5]
    saved = load_config(run / "config.yaml")
    assert saved.merging.method == "fpet" and saved.merging.r == [8, 4] and saved.merging.fpet["refine_dim"] == 8

"""PiToMe (models/pitome.py): the step of both layer kinds against the official code's outputs
(tests/data/golden/pitome/), a whole tiny ViT against the official patched one, the energy and the split as the
method defines them, token counts per layer, protected tokens, composition with LoRA / Adapter / PYRA,
torch.compile and torch.export, the configs at ToMe's FLOPs, config errors naming the key, and the demo
pipeline from YAML."""
import json
import warnings
from pathlib import Path

import pytest
import timm
import timm.layers.config as timm_config
import torch
from timm.models.deit import VisionTransformerDistilled

from lib.benchmark import count_flops, tokens_per_layer
from lib.build import build_model
from lib.config import ConfigError, load_config
from models import apply_patch, create_model, fold_lora, param_categories, set_reduction
from models.backbones import REDUCTION_SETTINGS
from models.pitome import PiToMe, PiToMeOptions, energy_matching, energy_score, pitome_schedule
from models.reduction import build_reduction, check_options

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "pitome"


def load_golden(name):
    return torch.load(GOLDEN / f"{name}.pt", weights_only=False)


def layer_of(r, protected=1, bipartite=False, **options):
    kind = "all" if bipartite else "none"
    return PiToMe(r, protected=protected, layer=0, depth=12,
                  options=PiToMeOptions(bipartite_layers=kind, **options))


def tiny(merging, grid=8, depth=3, **kwargs):
    """A custom ViT with a ``grid``×``grid`` patch grid (patch 4), by default width 16 with 2 heads and LoRA 2."""
    kwargs = {"peft": "lora", "peft_dim": 2, "embed_dim": 16, "num_heads": 2, **kwargs}
    return create_model("vit", num_classes=5, depth=depth, patch_size=4, img_size=4 * grid, method="pitome",
                        merging=merging, **kwargs)


# --- goldens: the official code's outputs -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["step_protecting", "step_protecting_alpha", "step_bipartite"])
def test_step_matches_the_official_code(name):
    """The official ``pitome_vision`` + ``merge_wavg`` (+ ``merge_source``): same tokens, sizes, sources, and the
    same gradient into the tokens (training runs this very step)."""
    g = load_golden(name)
    m = g["meta"]
    layer = layer_of(m["r"], bipartite=m["bipartite"], margin=m["margin"], alpha=m["alpha"])
    x_in = g["x"].clone().requires_grad_(True)
    source = None if g["source"] is None else g["source"].float()
    x, size, source = layer(x_in, g["size"], source, trace_source=source is not None, metric=g["metric"])
    assert x.shape == g["x_out"].shape == (g["x"].shape[0], g["x"].shape[1] - m["r"], g["x"].shape[-1])
    torch.testing.assert_close(x, g["x_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(size, g["size_out"], rtol=0, atol=0)
    if g["source"] is not None:
        assert torch.equal(source.bool(), g["source_out"])
    ((x * g["proj_x"]).sum() + (size * g["proj_size"]).sum()).backward()
    torch.testing.assert_close(x_in.grad, g["grad_x"], rtol=1e-5, atol=1e-6)


def test_whole_tiny_vit_matches_the_official_patched_model():
    """Same weights as the official DeiT/ViT ``apply_patch`` with keep ratio 0.8 (4 blocks: two bipartite, two
    protecting; margins 0.75 → 0.1875); attention without sizes as the official code's; eval and train-mode
    logits and gradients agree."""
    g = load_golden("vit")
    s = g["spec"]
    schedule = pitome_schedule(g["ratio"], (s["img_size"] // s["patch_size"]) ** 2, s["depth"])
    model = create_model("vit", num_classes=s["num_classes"], embed_dim=s["embed_dim"], depth=s["depth"],
                         num_heads=s["num_heads"], patch_size=s["patch_size"], img_size=s["img_size"],
                         mlp_ratio=s["mlp_ratio"], peft="full", merging=schedule, method="pitome",
                         prop_attn=False, drop_path_rate=0.0)
    assert [b.reduction.margin for b in model.blocks] == g["margins"]
    assert [b.reduction.bipartite for b in model.blocks] == [True, True, False, False]
    report = model.load_state_dict(g["state_dict"])
    assert not report.missing_keys and not report.unexpected_keys
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(g["images"]), g["eval_logits"], rtol=1e-5, atol=1e-5)
    model.train()
    out = model(g["images"])
    torch.testing.assert_close(out, g["train_logits"], rtol=1e-5, atol=1e-5)
    (out * g["proj"]).sum().backward()
    grads = dict(model.named_parameters())
    for key, theirs in g["grads"].items():
        torch.testing.assert_close(grads[key].grad, theirs, rtol=1e-4, atol=1e-5 * max(theirs.abs().max().item(), 1e-3))


# --- the method as written in models/README.md ------------------------------------------------------------

def test_energy_ranks_clustered_tokens_high_and_the_protecting_kind_keeps_the_isolated_ones():
    """Four near-copies and two loners: the copies have the high energies, so with r = 2 the four copies merge
    pairwise (A = 1st and 3rd by energy, B = 2nd and 4th) and the two loners pass through unchanged."""
    copies = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.98, 0.0, 0.1], [0.99, 0.05, 0.05]])
    loners = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    metric = torch.cat([loners[:1], copies[:2], loners[1:], copies[2:]])[None]   # interleaved on purpose
    energy, sim = energy_score(metric, margin=0.5)
    assert set(energy[0].argsort(descending=True)[:4].tolist()) == {1, 2, 4, 5}
    assert torch.allclose(sim.diagonal(dim1=1, dim2=2), torch.ones(1, 6))
    x = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2)
    out = energy_matching(metric, 2, margin=0.5)(x, mode="mean")
    assert out.shape == (1, 4, 2)
    assert sorted(out[0, :2, 0].tolist()) == [0.0, 3.0]                     # the loners, kept as they are
    assert all(float(v) not in (0.0, 3.0) for v in out[0, 2:, 0])            # the merged copies


def test_margins_and_layer_kinds_follow_the_position():
    model = tiny(2, depth=4, method_options={"margin": 0.9})
    assert [b.reduction.margin for b in model.blocks] == [0.9, 0.9 - 0.9 * 0.25, 0.9 - 0.9 * 0.5, 0.9 - 0.9 * 0.75]
    assert [b.reduction.bipartite for b in model.blocks] == [True, True, False, False]   # official ViT/DeiT
    for rule, kinds in (("second_half", [False, False, True, True]), ("all", [True] * 4), ("none", [False] * 4)):
        model = tiny(2, depth=4, method_options={"bipartite_layers": rule})
        assert [b.reduction.bipartite for b in model.blocks] == kinds            # second_half: the official MAE


def test_token_counts_per_layer_of_the_configs_schedules():
    """On a 14x14 patch grid (ViT-B/16 at 224 px): the schedules are the official keep ratio (ρ = 0.875, 0.76),
    applied as written (no clamp warning); each layer keeps ⌈ρ·T⌉ of its T patch tokens."""
    for level, ratio in (("low", 0.875), ("high", 0.76)):
        schedule = REDUCTION_SETTINGS["pitome"][level]["merging.r"]
        assert schedule == pitome_schedule(ratio, 196, 12)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = tiny(schedule, grid=14, depth=12, embed_dim=8, num_heads=1)
        counts, t = [197], 196
        for r in schedule:
            t -= r
            counts.append(t + 1)
        assert tokens_per_layer(model, 56) == counts
    assert counts[-1] == 1 + 196 - sum(schedule) == 10                     # high: 9 patch tokens reach the norm


def test_r_is_clamped_to_half_the_unprotected_tokens():
    with pytest.warns(UserWarning, match="per layer it becomes"):
        model = tiny([40, 40, 0], grid=8)
    assert model.r == [32, 16, 0] and tokens_per_layer(model, 32) == [65, 33, 17, 17]


# --- protected tokens, composition, compile / export ------------------------------------------------------

@pytest.mark.parametrize("bipartite", [False, True])
@pytest.mark.parametrize("protected", [1, 2, 4])
def test_protected_tokens_take_no_part(protected, bipartite):
    """The leading tokens come out unchanged with size 1, and the rest is exactly PiToMe without them."""
    torch.manual_seed(1)
    x, metric = torch.randn(2, protected + 16, 6), torch.randn(2, protected + 16, 8)
    out, size, source = layer_of(5, protected, bipartite)(x, None, None, trace_source=True, metric=metric)
    rest, rest_size, _ = layer_of(5, 0, bipartite)(x[:, protected:], None, None, metric=metric[:, protected:])
    assert torch.equal(out[:, :protected], x[:, :protected])
    assert torch.equal(size[:, :protected], torch.ones(2, protected, 1))
    torch.testing.assert_close(out[:, protected:], rest, rtol=0, atol=0)
    assert torch.equal(size[:, protected:], rest_size) and size.sum() == 2 * (protected + 16)
    assert torch.equal(source[:, :protected], torch.eye(protected + 16)[:protected].expand(2, -1, -1))


def test_prompts_and_distillation_token_are_never_merged():
    torch.manual_seed(0)
    model = tiny([20, 10, 0], peft="prompt", peft_dim=3, trace_source=True).eval()
    assert model.blocks[0].protected == 4
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.source.shape == (2, 4 + 34, 4 + 64)
    assert torch.equal(model.source[:, :4], torch.eye(68)[:4].expand(2, -1, -1))   # class + prompts hold themselves
    deit = VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    apply_patch(deit, trace_source=True)
    deit.r = [6, 4]
    set_reduction(deit, "pitome")
    assert deit.blocks[0].protected == 2 and tokens_per_layer(deit, 16) == [18, 12, 8]
    with torch.no_grad():
        deit.eval()(torch.randn(1, 3, 16, 16))
    assert torch.equal(deit.source[:, :2], torch.eye(18)[:2][None])   # class and distillation token


def test_lora_adapter_and_pyra_compose():
    """LoRA with PYRA, and Adapter: what trains gets a gradient; PYRA starts at zero, i.e. exactly plain PiToMe,
    which LoRA folding leaves unchanged."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    models = {}
    for peft, pyra in (("lora", True), ("adapter", False)):
        model = models[peft] = tiny([20, 10, 0], peft=peft, pyra=pyra).train()
        categories = param_categories(model)
        trainable = {categories[n] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {peft, "head"} | ({"pyra"} if pyra else set())
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if p.requires_grad and categories[name] in (peft, "pyra") and not name.endswith("lora_a.weight"):
                assert p.grad is not None, name
    pyra = tiny([20, 10, 0], pyra=True).eval()
    plain = tiny([20, 10, 0]).eval()
    plain.load_state_dict({k: v for k, v in pyra.state_dict().items() if ".pyra." not in k})
    with torch.no_grad():
        torch.testing.assert_close(pyra(x), plain(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(fold_lora(plain)(x), pyra(x), rtol=1e-5, atol=1e-5)


def test_eval_model_through_torch_compile_and_export(compiles_and_exports):
    torch.manual_seed(0)
    compiles_and_exports(fold_lora(tiny([20, 10, 6]).eval()), torch.randn(2, 3, 32, 32))


# --- configs and errors -----------------------------------------------------------------------------------

@pytest.fixture
def explicit_attention():
    """timm's documented switch: attention built after this runs the explicit softmax (what fvcore sees in full)."""
    saved = timm_config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    yield
    timm_config._USE_FUSED_ATTN = saved


@pytest.mark.parametrize("level, tome, measured", [("low", 8.816e9, 8.835e9), ("high", 5.098e9, 5.148e9)])
def test_generated_configs_cost_what_tome_costs(level, tome, measured, explicit_attention):
    """fvcore multiply-adds (explicit attention, ViT-B/16 + LoRA 8, 100 classes, one 224² image) within 5 % of
    ToMe's at the same level; the configs hold the official options and attend without sizes."""
    cfg = load_config(REPO / "configs" / "vit_b16" / f"lora_pitome_{level}.yaml", ["model.pretrained="])
    setting = REDUCTION_SETTINGS["pitome"][level]
    assert cfg.merging.method == "pitome" and cfg.merging.r == setting["merging.r"]
    assert cfg.merging.prop_attn is False and cfg.merging.pyra is False
    assert check_options("pitome", cfg.merging.pitome) == PiToMeOptions()
    with torch.device("meta"):                     # no weight init: fvcore needs only shapes, and zeros are enough
        model = build_model(cfg, num_classes=100, pretrained=False)
    model = model.to_empty(device="cpu")
    for tensor in model.state_dict().values():
        tensor.zero_()
    assert not model.blocks[0].attn.fused_attn and model.r == setting["merging.r"]
    flops = count_flops(model)
    assert abs(flops / tome - 1) < 0.05 and abs(flops / measured - 1) < 0.001, flops


def test_bad_keys_are_config_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"^merging\.pitome\.margn: unknown key of method 'pitome'; "
                                         r"expected margin, alpha, bipartite_layers$"):
        check_options("pitome", {"margn": 0.5})
    for key, value, expected in (("margin", 1.5, r"expected a number in \[-1, 1\]"),
                                 ("margin", True, r"expected a number in \[-1, 1\]"),
                                 ("alpha", -1.0, "expected a number >= 0, got -1.0"),
                                 ("bipartite_layers", "half", "expected one of first_half, second_half, all, none")):
        with pytest.raises(ConfigError, match=rf"merging\.pitome\.{key}: {expected}"):
            load_config(REPO / "configs" / "vit_b16" / "lora_pitome_low.yaml", [f"merging.pitome.{key}={value}"])
    with pytest.raises(ValueError, match="'pitome' is built knowing the model's depth"):
        build_reduction("pitome", 8, 1, 16)
    with pytest.raises(ValueError, match=r"ratio: expected a keep ratio in \[0.5, 1\]"):
        pitome_schedule(0.4, 196, 12)


def test_demo_pipeline_trains_one_epoch_with_pitome_from_yaml(train_demo_epoch):
    run = train_demo_epoch(
        "merging:\n  method: pitome\n  r: [6, 4]\n  pyra: true\n  prop_attn: false\n"
        "  pitome: {margin: 0.75, alpha: 1.0, bipartite_layers: first_half}\n")
    assert json.loads((run / "efficiency.json").read_text())["tokens_per_layer"] == [17, 11, 7]
    saved = load_config(run / "config.yaml")
    assert saved.merging.method == "pitome" and saved.merging.r == [6, 4] and saved.merging.pitome["margin"] == 0.75

"""DTEM (models/dtem.py): the eval step and the training relaxation against the official code's outputs and gradients
(tests/data/golden/dtem/), a whole tiny ViT against the official patched one, token counts per layer, protected
tokens, composition with LoRA / Adapter, torch.compile and torch.export, the configs at ToMe's FLOPs, config errors
naming the key, and the demo pipeline from YAML."""
import json
import re
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
from lib.yamlconf import to_dict
from models import apply_patch, create_model, fold_lora, param_categories, param_report, set_reduction
from models.backbones import REDUCTION_SETTINGS, named_schedule
from models.dtem import DTEM, DTEMOptions, soft_top_r
from models.reduction import check_options, setup_reductions
from models.vit import resolve_schedule

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "dtem"


def load_golden(name):
    return torch.load(GOLDEN / f"{name}.pt", weights_only=False)


def dtem_layer(r, dim, head_dim, protected=1, earlier=(), **options):
    layer = DTEM(r, protected=protected, dim=dim, layer=len(earlier), head_dim=head_dim, options=DTEMOptions(**options))
    DTEM.setup(None, [*earlier, layer])
    return layer


def golden_layer(g):
    dim = g["x"].shape[-1]
    layer = dtem_layer(g["r"], dim, dim // g["meta"]["heads"])
    with torch.no_grad():
        layer.embed.weight.copy_(g["weights"]["weight"])
        layer.embed.bias.copy_(g["weights"]["bias"])
    return layer


def tiny(merging, grid=8, depth=3, **kwargs):
    """A custom ViT with a ``grid``×``grid`` patch grid (patch 4), by default width 16 with 2 heads and LoRA 2."""
    kwargs = {"peft": "lora", "peft_dim": 2, "embed_dim": 16, "num_heads": 2, **kwargs}
    return create_model("vit", num_classes=5, depth=depth, patch_size=4, img_size=4 * grid, method="dtem",
                        merging=merging, **kwargs)


# --- goldens: the official code's outputs -----------------------------------------------------------------

def test_eval_step_matches_the_official_code():
    """The official eval merge (metric from the fused qkv + embedding weight, ToMe's matching, weighted average)."""
    g = load_golden("step_eval")
    layer = golden_layer(g).eval()
    with torch.no_grad():
        x, size, _ = layer(g["x"], g["size"][..., None], None, features=g["features"])
    assert x.shape == g["x_out"].shape == (2, 12, 12)
    torch.testing.assert_close(x, g["x_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(size[..., 0], g["size_out"], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["all", "partial"])
def test_training_relaxation_matches_the_official_code_with_gradients(case):
    """The soft top-r merge on every token ("all") and on the first ``n`` only ("partial": an earlier layer took
    5 of the 17 tokens out of the matching): tokens, sizes and gradients to float rounding; no token is dropped."""
    g = load_golden("step_train")[case]
    n_tokens = g["x"].shape[1]
    earlier = ()
    if g["active"] < n_tokens:
        before = DTEM(0, dim=12, head_dim=6)
        before.r = n_tokens - g["active"]        # only its r counts here (a layer built with r = 0 has no embedding)
        earlier = (before,)
    layer = golden_layer({**g, "r": g["r"]})
    layer._earlier = earlier
    assert layer.active_tokens(n_tokens) == g["active"]
    layer.train()
    x_in = g["x"].clone().requires_grad_(True)
    size_in = g["size"][..., None].clone().requires_grad_(True)
    x, size, _ = layer(x_in, size_in, None, features=g["features"])
    assert x.shape == g["x"].shape
    torch.testing.assert_close(x, g["x_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(size[..., 0], g["size_out"], rtol=0, atol=1e-11)   # exact 0s are 1e-12 here
    ((x * g["proj_x"]).sum() + (size[..., 0] * g["proj_size"]).sum()).backward()
    torch.testing.assert_close(x_in.grad, g["grad_x"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(size_in.grad[..., 0], g["grad_size"], rtol=1e-5, atol=1e-6)
    for ours, theirs in ((layer.embed.weight.grad, g["grad_weight"]), (layer.embed.bias.grad, g["grad_bias"])):
        assert theirs.abs().max() > 1e-2                             # the embedding really learns from the loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())


def test_exact_zero_sizes_reach_attention_without_nan():
    """The official relaxation leaves some merged-away sizes at exactly 0. log(0) in proportional attention would make
    their gradient NaN; the forward-only floor (1e-12) keeps every gradient finite and the size gradient unchanged."""
    g = load_golden("step_train")["all"]
    assert (g["size_out"] == 0).any()
    layer = golden_layer(g).train()
    size_in = g["size"][..., None].clone().requires_grad_(True)
    x, size, _ = layer(g["x"], size_in, None, features=g["features"])
    attn = tiny([0, 0, 0], embed_dim=12, num_heads=2).blocks[0].attn
    for sizes, finite in ((size, True), (size - size.detach() + torch.where(size < 1e-11, 0.0, size.detach()), False)):
        size_in.grad = None
        attn(x, sizes)[0].sum().backward(inputs=[size_in], retain_graph=True)
        assert bool(size_in.grad.isfinite().all()) is finite


def official_vit_here():
    g = load_golden("vit")
    s = g["spec"]
    model = create_model("vit", num_classes=s["num_classes"], embed_dim=s["embed_dim"], depth=s["depth"],
                         num_heads=s["num_heads"], patch_size=s["patch_size"], img_size=s["img_size"],
                         mlp_ratio=s["mlp_ratio"], peft="full", merging=g["r"], method="dtem", drop_path_rate=0.0)

    def ours(key):
        return key.replace(".attn.qkv.qkv_layer.", ".attn.qkv.").replace(".attn.qkv.metric_layer.", ".reduction.embed.")

    fused = re.compile(r"attn\.qkv\.(weight|bias)$")               # the official eval-time fusion of qkv + embedding
    report = model.load_state_dict({ours(k): v for k, v in g["state_dict"].items() if not fused.search(k)})
    assert not report.missing_keys and not report.unexpected_keys
    return model, g, ours


def test_whole_tiny_vit_matches_the_official_patched_model():
    """Same weights as the official ``patch(k2=3, tau1=tau2=0.1)`` model with r = [12, 8, 6]: eval logits (hard
    merges), train logits and every parameter's gradient (soft merges, all tokens kept) agree."""
    model, g, ours = official_vit_here()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(g["images"]), g["eval_logits"], rtol=1e-5, atol=1e-6)
    model.train()
    out = model(g["images"])
    torch.testing.assert_close(out, g["train_logits"], rtol=1e-5, atol=1e-6)
    (out * g["proj"]).sum().backward()
    grads = dict(model.named_parameters())
    assert sum(".metric_layer." in k for k in g["grads"]) == 6
    for key, theirs in g["grads"].items():
        torch.testing.assert_close(grads[ours(key)].grad, theirs, rtol=1e-4,
                                   atol=1e-5 * max(theirs.abs().max().item(), 1e-3))


# --- the method as written in models/README.md ------------------------------------------------------------

def test_soft_top_r_picks_r_entries_and_caps_each_source():
    """Sharp temperatures give the hard top-r of the kept candidates; a source never gives away more than itself."""
    scores = torch.tensor([[[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.2, 0.1, 0.0]]])
    assign = soft_top_r(scores, 2, top_k=2, tau1=0.1, tau2=0.01)
    torch.testing.assert_close(assign, torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]]), rtol=0, atol=1e-4)
    soft = soft_top_r(torch.rand(2, 6, 5), 3, top_k=3, tau1=1.0, tau2=1.0)
    assert (soft.sum(-1) <= 1 + 1e-6).all() and ((soft > 0).sum(-1) <= 3).all()
    torch.testing.assert_close(soft.sum((1, 2)), torch.full((2,), 3.0), rtol=0, atol=0.6)   # about r in all


def test_token_counts_per_layer_and_the_active_tokens_of_training():
    """Evaluation removes ToMe's counts (the configs' schedules on a 14x14 grid, no clamp warning); training keeps all
    197 tokens, each layer matching among the first ``n`` that evaluation would still hold there."""
    for level in ("low", "high"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = tiny(level, grid=14, depth=12, embed_dim=8, num_heads=1)
        counts = tokens_per_layer(model, 56)
        assert counts == [197 - sum(named_schedule(level, "vit", 12)[:i]) for i in range(13)]   # ToMe's
        layers = [b.reduction for b in model.blocks]
        assert [layer.active_tokens(197) for layer in layers] == counts[:-1]
    model = tiny([16, 8, 4], drop_path_rate=0.0).train()
    x, size, _ = model.forward_tokens(torch.randn(2, 3, 32, 32))
    assert x.shape[1] == 65 and size.shape == (2, 65, 1)
    torch.testing.assert_close(size.sum(1), torch.full((2, 1), 65.0), rtol=0, atol=1e-3)   # soft merges keep the mass
    assert (size[:, 1:41].diff(dim=1) <= 0).all()    # the last layer's 40 active tokens, sorted: merged-away ones last


def test_embedding_input_is_detached_and_only_the_embedding_learns_the_matching():
    torch.manual_seed(0)
    model = tiny([16, 8, 0], peft="full", drop_path_rate=0.0).train()
    model.forward_tokens(torch.randn(2, 3, 32, 32))[1].pow(2).sum().backward()   # sizes depend on the matching only
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["blocks.0.reduction.embed.weight"].abs().sum() > 0
    assert grads["blocks.1.reduction.embed.bias"].abs().sum() > 0
    assert all(g is None or not g.any() for n, g in grads.items() if ".reduction." not in n)
    assert model.blocks[2].reduction.embed is None                  # built with r = 0: no embedding
    with pytest.raises(ValueError, match="DTEM layer 2 was built with r = 0 and has no embedding"):
        model.r = [16, 8, 4]
        model(torch.randn(1, 3, 32, 32))


# --- protected tokens, composition, compile / export ------------------------------------------------------

@pytest.mark.parametrize("protected", [1, 2, 4])
def test_protected_tokens_are_never_reduced(protected):
    torch.manual_seed(1)
    layer = dtem_layer(6, 8, 4, protected=protected)
    x, features = torch.randn(2, protected + 16, 8), torch.randn(2, protected + 16, 8)
    for training in (False, True):
        layer.train(training)
        out, size, source = layer(x, None, None, trace_source=not training, features=features)
        assert out.shape[1] == protected + 16 - (0 if training else 6)
        assert torch.equal(out[:, :protected], x[:, :protected])
        assert torch.equal(size[:, :protected], torch.ones(2, protected, 1))
        if not training:
            assert torch.equal(source[:, :protected], torch.eye(protected + 16)[:protected].expand(2, -1, -1))


def test_prompts_and_distillation_token_are_never_merged():
    torch.manual_seed(0)
    model = tiny([16, 8, 0], peft="prompt", peft_dim=3, trace_source=True).eval()
    assert model.blocks[0].protected == 4
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.source.shape == (2, 4 + 40, 4 + 64)
    assert torch.equal(model.source[:, :4], torch.eye(68)[:4].expand(2, -1, -1))   # class + prompts hold themselves
    model.train()
    model.trace_source = False
    x, size, _ = model.forward_tokens(torch.randn(2, 3, 32, 32))
    assert torch.equal(size[:, :4], torch.ones(2, 4, 1))
    deit = VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    apply_patch(deit, trace_source=True)
    deit.r = [4, 2]
    set_reduction(deit, "dtem")                                      # built knowing its r, as create_model does
    assert deit.blocks[0].protected == 2 and tokens_per_layer(deit, 16) == [18, 14, 12]
    with torch.no_grad():
        deit.eval()(torch.randn(1, 3, 16, 16))
    assert torch.equal(deit.source[:, :2], torch.eye(18)[:2][None])   # class and distillation token
    deit.train().trace_source = False
    with pytest.raises(ValueError, match="setup_reductions"):        # training needs the layers' order
        deit(torch.randn(1, 3, 16, 16))
    setup_reductions(deit)
    deit(torch.randn(1, 3, 16, 16))


def test_lora_and_adapter_compose():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for peft, category in (("lora", "lora"), ("adapter", "adapter")):
        model = tiny([16, 8, 0], peft=peft).train()
        categories = param_categories(model)
        trainable = {categories[n] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {category, "reduction", "head"}
        assert param_report(model)["reduction"] == (2 * (16 * 8 + 8), 2 * (16 * 8 + 8))   # 2 layers, 16 -> head_dim 8
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if p.requires_grad and categories[name] in (category, "reduction"):
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="PYRA composes with token merging"):
        tiny([16, 8, 0], pyra=True)


def test_eval_model_through_torch_compile_and_export(compiles_and_exports):
    torch.manual_seed(0)
    compiles_and_exports(fold_lora(tiny([16, 8, 4]).eval()), torch.randn(2, 3, 32, 32))


# --- configs and errors -----------------------------------------------------------------------------------

@pytest.fixture
def explicit_attention():
    """timm's documented switch: attention built after this runs the explicit softmax (what fvcore sees in full)."""
    saved = timm_config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    yield
    timm_config._USE_FUSED_ATTN = saved


def test_generated_configs_cost_what_tome_costs(explicit_attention):
    """fvcore (explicit attention, random weights, 100 classes, one 224² image) counts 8.880e9 / 5.138e9: ToMe's
    8.816e9 / 5.098e9 plus the embedding (768 -> 64 on the tokens of each merging layer), under 1 % above ToMe.
    The two configs differ only in ``merging.r``, so one model is built and counted at both schedules."""
    cfgs = {level: load_config(REPO / "configs" / "vit_b16" / f"lora_dtem_{level}.yaml", ["model.pretrained="])
            for level in ("low", "high")}
    for level, cfg in cfgs.items():
        setting = REDUCTION_SETTINGS["dtem"][level]
        assert cfg.merging.method == "dtem" and cfg.merging.r == level
        assert cfg.merging.dtem == setting["merging.dtem"]
        assert check_options("dtem", cfg.merging.dtem) == DTEMOptions()
        plain = {k: v for k, v in to_dict(cfg).items() if k not in ("experiment", "config_path")}
        low = {k: v for k, v in to_dict(cfgs["low"]).items() if k not in ("experiment", "config_path")}
        assert plain == {**low, "merging": {**low["merging"], "r": level}}
    with torch.device("meta"):                       # counts depend on shapes only: skip the random init
        model = build_model(cfgs["low"], num_classes=100, pretrained=False)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    assert model.blocks[0].reduction.embed_dim == 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for level, tome, measured in (("low", 8.816e9, 8.880e9), ("high", 5.098e9, 5.138e9)):
            model.r = resolve_schedule(level, cfgs[level].model.name, 12)
            assert all(b.reduction.embed is not None for b in model.blocks)
            flops = count_flops(model)
            assert abs(flops / measured - 1) < 1e-3 and 0 < flops / tome - 1 < 0.01, (level, flops)
    finally:
        torch.set_num_threads(threads)


def test_bad_keys_are_config_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"^merging\.dtem\.k2: unknown key of method 'dtem'; "
                                         r"expected embed_dim, top_k, tau1, tau2$"):
        check_options("dtem", {"k2": 3})
    for key, value, expected in (("top_k", 0, "expected an integer >= 1, got 0"),
                                 ("embed_dim", 1.5, "expected an integer >= 1, got 1.5"),
                                 ("tau1", 0, "expected a number > 0, got 0"),
                                 ("tau2", True, "expected a number > 0, got True")):
        with pytest.raises(ConfigError, match=rf"merging\.dtem\.{key}: {expected}"):
            load_config(REPO / "configs" / "vit_b16" / "lora_dtem_low.yaml", [f"merging.dtem.{key}={value}"])


def test_demo_pipeline_trains_one_epoch_with_dtem_from_yaml(train_demo_epoch):
    run = train_demo_epoch(
        "merging:\n  method: dtem\n  r: [4, 2]\n  pyra: false\n"
        "  dtem: {embed_dim: 8, top_k: 3, tau1: 0.1, tau2: 0.1}\n")
    efficiency = json.loads((run / "efficiency.json").read_text())
    assert efficiency["tokens_per_layer"] == [17, 13, 11]
    assert efficiency["parameters"]["reduction"] == {"total": 2 * (32 * 8 + 8), "trainable": 2 * (32 * 8 + 8)}
    saved_keys = torch.load(run / "last.pth", weights_only=True)["model"]
    assert {k for k in saved_keys if ".reduction." in k} == {f"blocks.{i}.reduction.embed.{w}" for i in (0, 1)
                                                             for w in ("weight", "bias")}   # the embedding is saved
    saved = load_config(run / "config.yaml")
    assert saved.merging.method == "dtem" and saved.merging.r == [4, 2] and saved.merging.dtem["embed_dim"] == 8

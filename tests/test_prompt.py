"""Visual prompt tuning with token merging: the class/distillation token and every prompt are protected
(never merged, never merged into, kept in place) for every schedule form, shallow and deep, in training
and evaluation; token counts are the schedule's plus the protected tokens; the prompt parameters train
and nothing frozen does; PYRA starts as the identity; pooling, intermediates, FLOPs and checkpoints see
the prompts correctly; and a prompt + PYRA run of the demo learns."""
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from lib.benchmark import count_flops
from models import (
    bipartite_soft_matching,
    create_model,
    fold_lora,
    load_checkpoint,
    merge_source,
    merge_wavg,
    param_report,
    trainable_state_dict,
)
from models.backbones import named_schedule
from models.tome import max_merge

REPO = Path(__file__).resolve().parents[1]
P = 5                                                                        # prompt tokens in the tiny models
TINY = dict(embed_dim=32, depth=12, num_heads=2, patch_size=4, img_size=32)  # 64 patches + cls
SCHEDULES = ["low", "high", 6, (6, 0.5), {"r": 6, "inflection": -0.5}, [20, 10, 5]]


def tiny(peft="prompt", seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(num_classes=10, **TINY)
    if peft == "prompt":
        args["peft_dim"] = P
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "high" is clamped to 64 patches
        return create_model("vit", peft=peft, **args).eval()


def randomize_trainable(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def run_layers(model, x):
    """Per block: its input tokens (after prompt insertion/replacement) and its output (x, size, source)."""
    inputs, outputs = [], []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in model.blocks]
    hooks += [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in model.blocks]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, inputs, outputs


def assert_protected(outputs, k, n0):
    """In every layer the first ``k`` tokens are their own and only source, and no other token holds them."""
    eye = torch.eye(n0)
    for i, (x, size, source) in enumerate(outputs):
        if source is None:            # nothing merged yet: every token is itself
            assert x.shape[1] == n0, i
            continue
        assert torch.equal(source[:, :k], eye[:k].expand(x.shape[0], k, n0)), f"layer {i}"
        assert source[:, k:, :k].sum() == 0, f"layer {i}: a protected token was merged into another"
        assert torch.equal(source.sum(1), torch.ones(x.shape[0], n0)), f"layer {i}: every input in one token"
        assert torch.equal(size[:, :k, 0], torch.ones(x.shape[0], k)), f"layer {i}"


# --- the matching with k protected tokens ------------------------------------------------------------

def test_protected_generalises_class_and_distillation_token():
    g = torch.Generator().manual_seed(0)
    for n in (17, 18):
        metric, x = torch.randn(2, n, 8, generator=g), torch.randn(2, n, 6, generator=g)
        for tokens, k in (((True, False), 1), ((True, True), 2), ((False, False), 0)):
            tome, _ = bipartite_soft_matching(metric, 5, *tokens)
            ours, _ = bipartite_soft_matching(metric, 5, protected=k)
            for mode in ("sum", "mean", "amax"):
                assert torch.equal(tome(x, mode=mode), ours(x, mode=mode))
    with pytest.raises(ValueError, match="needs class_token"):
        bipartite_soft_matching(metric, 2, class_token=False, distill_token=True)
    with pytest.raises(ValueError, match="unprotected"):
        bipartite_soft_matching(metric, 2, class_token=True, distill_token=True, protected=1)


@pytest.mark.parametrize("k", [3, 4, 7, 12])
@pytest.mark.parametrize("n", [29, 30])
def test_k_protected_tokens_stay_in_place_and_alone(k, n):
    g = torch.Generator().manual_seed(k * n)
    metric, x = torch.randn(3, n, 8, generator=g), torch.randn(3, n, 6, generator=g)
    size = torch.randint(1, 4, (3, n, 1), generator=g).float()
    merge, unmerge = bipartite_soft_matching(metric, 100, protected=k)     # clamped to (n - k) // 2
    r = (n - k) // 2
    merged, merged_size = merge_wavg(merge, x, size)
    source = merge_source(merge, x)
    assert merged.shape[1] == n - r
    assert torch.allclose(merged[:, :k], x[:, :k], atol=1e-6) and torch.equal(merged_size[:, :k], size[:, :k])
    assert torch.equal(merge(x)[:, :k], x[:, :k])
    assert torch.equal(source[:, :k], torch.eye(n)[:k].expand(3, k, n)) and source[:, k:, :k].sum() == 0
    assert torch.allclose(merged, (source @ (x * size)) / (source @ size), atol=1e-6)
    assert torch.equal(merged_size.sum(1), size.sum(1))
    restored = unmerge(merged)                  # each input position gets the token it went into
    assert torch.allclose(restored, (source.transpose(1, 2) @ merged), atol=1e-6)
    assert torch.equal(unmerge(merge(x))[:, :k], x[:, :k])


# --- prompts never merge, for every schedule -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["shallow", "deep"])
@pytest.mark.parametrize("pyra", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_prompts_never_merged_in_any_layer(schedule, pyra, mode):
    model = tiny(merging=schedule, pyra=pyra, prompt_mode=mode, trace_source=True)
    randomize_trainable(model)
    assert any(model.r)
    x = torch.randn(2, 3, 32, 32)
    k = 1 + P
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            _, inputs, outputs = run_layers(model, x)
        assert_protected(outputs, k, 65 + P)
        if not train:   # prompts sit right after the class token; deep: each block gets exactly its own
            for i, tokens in enumerate(inputs):
                layer = i if mode == "deep" else 0
                if mode == "deep" or i == 0:
                    assert torch.equal(tokens[:, 1:k], model.prompt.tokens[layer].expand(2, P, -1)), i
        assert torch.equal(model.source, outputs[-1][2])


@pytest.mark.parametrize("schedule", SCHEDULES + [[40, 40, 0, 40]], ids=str)
def test_token_counts_are_the_schedule_plus_protected_tokens(schedule):
    plain = tiny(peft="none", merging=schedule)
    prompted = tiny(merging=schedule, prompt_mode="deep")
    assert prompted.r == plain.r                           # the clamp counts only unprotected tokens
    requested = named_schedule(schedule, "vit", 12) if isinstance(schedule, str) else None
    if requested is not None:
        left, expected = 64 + 1, []                         # ToMe's clamp by hand, as for the plain model
        for r in requested:
            expected.append(min(r, max_merge(left, 1)))
            left -= expected[-1]
        assert prompted.r == expected
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, _, plain_out = run_layers(plain, x)
        _, inputs, out = run_layers(prompted, x)
    counts = [t.shape[1] for t in inputs] + [out[-1][0].shape[1]]
    plain_counts = [65] + [o[0].shape[1] for o in plain_out]
    assert counts == [c + P for c in plain_counts]
    assert counts[1:] == [c - r for c, r in zip(counts, prompted.r)]


def test_vit_b16_high_token_counts_and_prompt_parameters():
    torch.manual_seed(0)
    shallow = create_model("vit_base_patch16_224_in21k", num_classes=100, peft="prompt", merging="high",
                           pyra=True).eval()
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for b in shallow.blocks]
    hooks.append(shallow.norm.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])))
    with torch.no_grad():
        shallow(torch.randn(1, 3, 224, 224))
    paper = [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]      # ViT-B/16 "high" without prompts
    assert counts == [n + 10 for n in paper]                             # default length 10
    report = param_report(shallow)
    assert report["prompt"] == (10 * 768, 10 * 768)
    assert report["pyra"] == (27840, 27840) and report["head"] == (76900, 76900)
    assert report["lora"] == report["adapter"] == (0, 0) and report["backbone"][1] == 0
    bound = math.sqrt(6 / (3 * 16 * 16 + 768))                          # VPT's init
    tokens = shallow.prompt.tokens
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.99 * bound and abs(tokens.mean()) < 0.01 * bound
    assert shallow.prompt.dropout.p == 0.1
    deep = create_model("vit_base_patch16_224_in21k", num_classes=100, peft="prompt", prompt_mode="deep",
                        peft_dim=50)
    assert param_report(deep)["prompt"] == (12 * 50 * 768, 12 * 50 * 768)
    assert param_report(deep)["backbone"] == param_report(shallow)["backbone"]


def test_deit_class_distillation_token_and_prompts_protected():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("deit_small_distilled_patch16_224", num_classes=4, peft="prompt", peft_dim=4,
                             prompt_mode="deep", merging="high", pyra=True, img_size=64, trace_source=True)
    randomize_trainable(model)
    assert model.blocks[0].protected == 2 + 4 and model.prompt.offset == 2
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            logits, inputs, outputs = run_layers(model, x)
        assert logits.shape == (2, 4)
        assert_protected(outputs, 6, 16 + 6)
    model.eval()
    with torch.no_grad():
        _, inputs, _ = run_layers(model, x)
        for i, tokens in enumerate(inputs):
            assert torch.equal(tokens[:, 2:6], model.prompt.tokens[i].expand(2, 4, -1)), i
        tokens, size, _ = model.forward_tokens(x)
        # both heads read their own token, not a prompt
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        assert torch.allclose(model(x), expected, atol=1e-6)


# --- training: gradients, PYRA identity, pooling -----------------------------------------------------

@pytest.mark.parametrize("mode", ["shallow", "deep"])
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_gradients_reach_the_prompts_and_nothing_frozen(mode, global_pool):
    model = tiny(merging=[8, 8, 4, 4], pyra=True, prompt_mode=mode, global_pool=global_pool).train()
    randomize_trainable(model)
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"prompt", "blocks", "head"}
    assert all(".reduction.pyra." in n for n in trainable if n.startswith("blocks."))
    last = f"blocks.{len(model.blocks) - 1}.reduction.pyra."
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif global_pool == "token" and name.startswith(last):   # its merge never reaches the class token
            assert p.grad.abs().sum() == 0, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    grad = model.prompt.tokens.grad
    assert grad.shape == ((12, P, 32) if mode == "deep" else (1, P, 32))
    assert all(g.abs().sum() > 0 for g in grad)     # every layer's prompts learn
    assert param_report(model)["backbone"][1] == 0


@pytest.mark.parametrize("mode", ["shallow", "deep"])
def test_pyra_is_the_exact_identity_at_init_with_prompts(mode):
    plain = tiny(merging=[8, 6, 4, 2], prompt_mode=mode)
    with_pyra = tiny(merging=[8, 6, 4, 2], prompt_mode=mode, pyra=True)
    with_pyra.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(plain.prompt.tokens, with_pyra.prompt.tokens)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), with_pyra(x))


@pytest.mark.parametrize("merging", [None, [8, 8, 8, 8]])
def test_average_pooling_excludes_prompts(merging):
    model = tiny(merging=merging, global_pool="avg", prompt_mode="deep")
    randomize_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, size, _ = model.forward_tokens(x)
        size = torch.ones_like(tokens[..., :1]) if size is None else size
        patches, patch_size = tokens[:, 1 + P:], size[:, 1 + P:]
        assert torch.equal(patch_size.sum(dim=(1, 2)), torch.full((2,), 64.0))
        pooled = (patches * patch_size).sum(1) / 64
        assert torch.allclose(model(x), model.head(model.fc_norm(pooled)), atol=1e-5)
        assert torch.allclose(model.forward_head(tokens, size=size), model(x), atol=1e-6)


def test_feature_api_leaves_prompts_out():
    model = tiny(merging=[8, 8] + [0] * 10, prompt_mode="deep")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 1, 11], output_fmt="NLC")
        assert [t.shape[1] for t in inter] == [64 - 8, 64 - 16, 64 - 16]
        assert torch.equal(final, model.forward_features(x)) and final.shape[1] == 1 + P + 48
        model.r = 0
        grid = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert grid[0].shape == (2, 32, 8, 8)
        prefix = model.forward_intermediates(x, indices=1, intermediates_only=True, return_prefix_tokens=True,
                                             output_fmt="NLC")
        assert prefix[0][1].shape == (2, 1, 32)


def test_lora_folding_and_checkpoints_unaffected(tmp_path):
    model = tiny(merging=[8, 8, 4, 4], pyra=True, prompt_mode="deep")
    randomize_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert torch.equal(fold_lora(model)(x), before)            # nothing to fold, nothing changes
    state = trainable_state_dict(model)
    assert "prompt.tokens" in state and not any(k.startswith(("patch_embed", "pos_embed")) for k in state)
    torch.save({"format": "pyra-checkpoint", "model": state}, tmp_path / "own.pth")
    fresh = tiny(merging=[8, 8, 4, 4], pyra=True, prompt_mode="deep")
    report = load_checkpoint(fresh, str(tmp_path / "own.pth"))
    assert not report.unexpected
    with torch.no_grad():
        assert torch.equal(fresh(x), before)


def test_flop_counts_include_the_prompt_tokens():
    def linear_flops(model):
        analysis = FlopCountAnalysis(model, torch.randn(1, 3, 32, 32))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return analysis.by_operator()["linear"]

    plain, prompted = tiny(peft="none"), tiny()
    head = 32 * 10
    # every block linear runs once per token: (65 + P) tokens instead of 65; the head once per image
    assert linear_flops(prompted) - head == (65 + P) * (linear_flops(plain) - head) // 65
    merged_plain, merged = tiny(peft="none", merging="high"), tiny(merging="high")
    assert count_flops(merged, img_size=32) > count_flops(merged_plain, img_size=32)


def test_export_and_grad_checkpointing_with_deep_prompts():
    model = tiny(merging=[8, 8, 4, 4], pyra=True, prompt_mode="deep", peft_dropout=0.0, drop_path_rate=0.0, depth=4)
    randomize_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-6)
    grads = []
    for enable in (False, True):
        model.train().set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).sum().backward()
        grads.append(model.prompt.tokens.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_create_model_arguments():
    assert tiny().prompt.num_tokens == P and tiny(peft_dim=None).prompt.num_tokens == 10
    assert not tiny().prompt.deep and tiny(prompt_mode="deep").prompt.deep
    with pytest.raises(ValueError, match="prompt_mode"):
        tiny(prompt_mode="middle")
    with pytest.raises(ValueError, match="needs peft='prompt'"):
        tiny(peft="lora", prompt_mode="deep")
    with pytest.raises(ValueError, match="peft_dim must be positive"):
        tiny(peft_dim=0)


# --- the demo learns with prompts ----------------------------------------------------------------------

DEMO = "configs/demo/digits_random.yaml"


def test_prompt_pyra_demo_learns(tmp_path):
    """Shallow prompts (10) + ToMe + PYRA on the random-backbone demo: measured 26.98% top-1 after 10 epochs
    (chance 10%; the same run with peft.type=none, head and PYRA only: 23.84%; the frozen random backbone
    limits both)."""
    from data.make_digits import write_digits

    write_digits(tmp_path / "data", "digits")
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / DEMO), "peft.type=prompt", "peft.dim=10",
           "optim.lr=5e-2", "train.epochs=10", "train.eval_interval=5", f"data.root={tmp_path / 'data'}",
           f"output_dir={tmp_path / 'out'}", "experiment=p"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "out" / "p" / "digits" / "seed0"
    final = json.loads((run / "final.json").read_text())
    assert final["last_acc1"] > 20.0, final                         # twice chance
    trained = torch.load(run / "last.pth", weights_only=True)["model"]
    assert trained["prompt.tokens"].shape == (1, 10, 64)
    assert any(k.endswith(".reduction.pyra.to_token_weight") for k in trained)

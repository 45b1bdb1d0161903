"""The generated ViT-B/16 LoRA configs of ranks 12 and 32: what they resolve to and what they build."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib.build import build_model
from lib.config import load_config
from models import param_report
from models.backbones import MERGING_SETTINGS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# ViT-B/16: LoRA on the fused qkv, r x (768 in + 3 x 768 out) per block, 12 blocks.
LORA_PARAMS = {12: 442_368, 32: 1_179_648}
HEAD_100 = 768 * 100 + 100


@pytest.mark.parametrize("rank", sorted(LORA_PARAMS))
@pytest.mark.parametrize("merging", list(MERGING_SETTINGS))
def test_rank_leaf_resolves_to_its_rank_and_merging(rank: int, merging: str) -> None:
    cfg = load_config(CONFIGS / "vit_b16" / f"lora_r{rank}_{merging}.yaml")
    expected = {k.split(".", 1)[1]: v for k, v in MERGING_SETTINGS[merging].items()}
    assert cfg.model.name == "vit_base_patch16_224_in21k" and cfg.model.pretrained == "weight/ViT-B_16.npz"
    assert (cfg.peft.type, cfg.peft.dim, cfg.peft.dropout, cfg.peft.init) == ("lora", rank, 0.1, "official")
    assert (cfg.merging.r, cfg.merging.pyra) == (expected["r"], expected["pyra"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.train.batch_size) == (1e-3, 100, 32)   # the official recipe


@pytest.mark.parametrize("rank", sorted(LORA_PARAMS))
@pytest.mark.parametrize("merging", ["none", "pyra_high"])
def test_rank_leaf_builds_with_the_official_lora_count(rank: int, merging: str) -> None:
    cfg = load_config(CONFIGS / "vit_b16" / f"lora_r{rank}_{merging}.yaml")
    with torch.device("meta"):                      # shapes only: no memory, no init time
        model = build_model(cfg, num_classes=100, pretrained=False)
    report = param_report(model)
    assert report["lora"] == (LORA_PARAMS[rank], LORA_PARAMS[rank])
    assert report["head"][1] == HEAD_100
    pyra = report["pyra"][1]
    assert (pyra == 0) == (merging == "none")
    assert report["total"][1] == LORA_PARAMS[rank] + HEAD_100 + pyra   # nothing else trains

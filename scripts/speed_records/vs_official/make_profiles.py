"""Per-operator profiles of this project and of the official PYRA code, same models, batch and machine.

    python scripts/speed_records/vs_official/make_profiles.py ours DIR
    VENV/bin/python scripts/speed_records/vs_official/make_profiles.py official DIR --official CHECKOUT

ViT-B/16 + LoRA 8 (random weights), fp32, batch 8, 2 threads; for "plain" and "pyra_high" (ToMe's high
schedule with PYRA): torch.profiler over 3 eval forwards (no_grad, after 2 warm-ups) and over 2 training steps
(forward, cross-entropy, backward, AdamW over the trainable parameters, after 2 warm-ups). VENV holds the
official code's timm 0.5.4 with the same torch (2.14.1), fvcore, easydict, pyyaml and scipy. The official models
are built from CHECKOUT's ``model`` package as its ``train.py`` builds them with its defaults and its
``ViT-B_prompt_lora_8`` config; nothing of it is copied here. Writes DIR/<side>_<infer|train>_<setting>.txt
and, for this project, the deployment path of PYRA high (eval, LoRA folded, ``torch.compile``):
DIR/ours_infer_pyra_high_deploy.txt.
"""
import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

NAME, BATCH, CLASSES = "vit_base_patch16_224_in21k", 8, 100
HIGH = [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]   # ToMe high for ViT-B/16, both codes' schedule


def build_official(checkout: str, setting: str) -> torch.nn.Module:
    sys.path.insert(0, checkout)
    import model as official  # the checkout's package (needs timm 0.5.4)
    from model.tome import apply_tome
    pyra = setting == "pyra_high"
    with contextlib.redirect_stdout(io.StringIO()):   # it prints every module
        m = official.__dict__[NAME](img_size=224, drop_rate=0.0, drop_path_rate=0.1, prompt_tuning_dim=0, LoRA_dim=8,
                                    adapter_dim=0, prefix_dim=0, drop_rate_LoRA=0.1, drop_rate_prompt=0.1,
                                    drop_rate_adapter=0.1, IS_not_position_VPT=False, pyra_r=HIGH if pyra else None)
        if pyra:
            apply_tome(m)
            m.r = list(HIGH)
        m.reset_classifier(CLASSES)
        m.freeze_stages()
    return m


def build_ours(setting: str) -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    import models
    pyra = setting == "pyra_high"
    return models.create_model(NAME, num_classes=CLASSES, peft="lora", peft_dim=8, merging="high" if pyra else None,
                               pyra=pyra)


def tables(prof: profile, rows: int) -> str:
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60, max_shapes_column_width=90)
    return f"{by_op}\n\nby input shape\n{by_shape}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("side", choices=["ours", "official"])
    p.add_argument("out", type=Path)
    p.add_argument("--official", help="a checkout of github.com/THU-MIG/PYRA (side 'official')")
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 224, 224, generator=g)
    y = torch.randint(CLASSES, (BATCH,), generator=g)
    for setting in ("plain", "pyra_high"):
        torch.manual_seed(0)
        m = build_official(args.official, setting) if args.side == "official" else build_ours(setting)
        m.eval()
        with torch.no_grad():
            for _ in range(2):
                m(x)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    m(x)
        (args.out / f"{args.side}_infer_{setting}.txt").write_text(tables(prof, 40))
        if args.side == "ours" and setting == "pyra_high":   # the deployment path: LoRA folded, torch.compile
            import copy

            import models
            deployed = torch.compile(models.fold_lora(copy.deepcopy(m)))
            with torch.no_grad():
                for _ in range(2):
                    deployed(x)
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    for _ in range(3):
                        deployed(x)
            (args.out / "ours_infer_pyra_high_deploy.txt").write_text(tables(prof, 40))
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3, weight_decay=1e-4)

        def step(m: torch.nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            m.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(2):
                step()
        (args.out / f"{args.side}_train_{setting}.txt").write_text(tables(prof, 50))
        print(f"{args.side} {setting}: written")


if __name__ == "__main__":
    main()

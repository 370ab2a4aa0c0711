"""``eva``: init | train | eval | merge | compare | plot | demo.

Settings come from ``--preset``, ``--config file.yaml`` and ``key=value`` overrides (``eva.rho=2``),
in that order of precedence (later wins); the common ones also have flags. Any bad input ends with
one line on stderr naming the problem (and the valid choices) and exit code 2, before anything is
written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2  # bad input: nothing was computed or written
EXIT_NOT_CONVERGED = 3  # strict=true and EVA stopped before converging: no state or adapter written


def _run_options(parser: argparse.ArgumentParser) -> None:
    from .models import BUNDLED_MODELS
    from .run_config import presets
    from .tasks import TASKS

    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="RunConfig / EvaConfig fields, e.g. rank=4 eva.rho=2 max_steps=50",
    )
    parser.add_argument("--config", help="YAML file mirroring RunConfig (with an eva: section)")
    parser.add_argument(
        "--preset", help="a bundled recipe config (see `eva presets`): " + " | ".join(presets())
    )
    parser.add_argument(
        "--model", help="local model folder, or a bundled model: " + ", ".join(BUNDLED_MODELS)
    )
    parser.add_argument("--task", help=" ".join(TASKS))
    parser.add_argument("--data-dir", dest="data_dir", help="folder laid out like ../shared/data")
    parser.add_argument(
        "--train-file", dest="train_file", help="training file (json, jsonl, tsv, csv, parquet)"
    )
    parser.add_argument("--eval-file", dest="eval_file", help="evaluation file")
    parser.add_argument("--output-dir", dest="output_dir")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace what an earlier run left in the output folder (else it is refused)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="accept a state, adapter or resumed run made for other settings, model or data",
    )
    parser.add_argument(
        "--load-in-4bit",
        dest="load_in_4bit",
        action="store_const",
        const="nf4",
        help="load the base in NF4 with bitsandbytes (QLoRA); load_in_4bit=fp4 for FP4",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eva", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="compute and save an EVA state (the SVD precompute step)")
    _run_options(p)
    p.add_argument("--output", help="state folder (default: <output_dir>/eva_state)")
    p.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every",
        type=int,
        default=0,
        help="save the streaming statistics every N batches (to <output>.ckpt), atomically; with "
        "--sequential, any N commits every finished block there",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from <output>.ckpt after a crash or kill"
    )
    p.add_argument(
        "--adapter-out",
        dest="adapter_out",
        help="where the ready, untrained PEFT adapter goes (default: <output>_adapter)",
    )
    p.add_argument(
        "--no-adapter", dest="no_adapter", action="store_true", help="save the state only"
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        default=None,
        help="one decoder block at a time over the first min(64, eva.max_batches) batches: a model "
        "larger than the device; weights read block by block from a safetensors folder",
    )
    p.add_argument(
        "--offload",
        help="sequential: where hidden states wait between blocks: cpu (default) or a folder",
    )
    p.add_argument(
        "--blocks",
        help="sequential: dotted name of the decoder blocks' ModuleList (e.g. model.layers)",
    )

    from .initializers import INIT_METHODS

    p = sub.add_parser("train", help="LoRA fine-tuning from a registered initialisation")
    _run_options(p)
    p.add_argument("--init", help=" ".join(INIT_METHODS))
    p.add_argument("--eva-state", dest="eva_state", help="precomputed state folder (from eva init)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")

    p = sub.add_parser("eval", help="evaluate a base model or an adapter on a task")
    _run_options(p)
    p.add_argument("--adapter", help="PEFT adapter folder (omit to evaluate the base model)")
    p.add_argument("--output", help="write the metrics JSON here")
    p.add_argument(
        "--harness",
        choices=["eva", "lm-eval"],
        default="eva",
        help="our evaluator (default) or lm-evaluation-harness with the same prompts and answer "
        "extraction (generation tasks)",
    )

    p = sub.add_parser("compare", help="several inits x seeds on one task: mean +/- std table")
    _run_options(p)
    p.add_argument("--inits", default="lora,eva", help="comma-separated init names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument(
        "--lr",
        help="comma-separated learning rates: each init's rate is chosen on held-out training "
        "rows (validation=0.2 unless set), then its seeds run at that rate",
    )

    p = sub.add_parser(
        "merge", help="fold a trained LoRA adapter into its base and save a plain model"
    )
    _run_options(p)
    p.add_argument(
        "--adapter",
        required=True,
        help="PEFT LoRA adapter folder (from eva train, or any PEFT tool)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="folder for the merged model (safetensors shards + tokenizer)",
    )
    p.add_argument(
        "--max-shard-size", dest="max_shard_size", default="5GB", help="largest safetensors shard"
    )

    sub.add_parser("presets", help="list the bundled recipe configs (eva train --preset NAME)")
    p = sub.add_parser(
        "plot", help="rank heat map and convergence of a state; loss curves of a comparison"
    )
    p.add_argument("--state", help="EVA state folder")
    p.add_argument(
        "--adapter", help="adapter folder: its eva_state/ (ours), else ranks from its LoRA weights"
    )
    p.add_argument("--compare", help="output folder of eva compare (loss curves)")
    p.add_argument("--out", required=True, help="folder for the PNG files")

    p = sub.add_parser(
        "demo", help="EVA vs random LoRA on a real model: SmolLM2 on GSM8K (or MiniLM on SST-2)"
    )
    p.add_argument(
        "--model",
        default="smollm2",
        choices=["smollm2", "minilm"],
        help="smollm2 (causal LM, math; default) or minilm (encoder, SST-2)",
    )
    p.add_argument("--quick", action="store_true", help="reduced form (CI)")
    p.add_argument("--output-dir", dest="output_dir", default="out/demo")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _config(args: argparse.Namespace) -> Any:
    from .run_config import build_run_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    for key in (
        "model",
        "task",
        "data_dir",
        "train_file",
        "eval_file",
        "output_dir",
        "seed",
        "init",
        "eva_state",
        "overwrite",
        "force",
        "load_in_4bit",
        "sequential",
        "offload",
        "blocks",
    ):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "resume", False) and args.command == "train":
        overrides["resume"] = True
    return build_run_config(args.preset, args.config, overrides)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .recipes.demo import run_demo

        result = run_demo(args.output_dir, args.quick, args.seed, args.model)
        print(result["table"])
        print(result["eva_summary"])
        print(f"plots and adapters in {args.output_dir}/")
        return 0
    if args.command == "plot":
        return _plot(args)
    if args.command == "presets":
        from .run_config import preset_summary, presets

        for name, path in presets().items():
            print(f"{name:12s} {path}\n{'':12s} {preset_summary(path)}")
        return 0
    cfg = _config(args)
    if args.command == "init":
        from ..state import STATE_DIR
        from .recipes.init import ready_adapter_path, run_init

        output = args.output or str(Path(cfg.output_dir) / STATE_DIR)
        adapter = (
            None if args.no_adapter else args.adapter_out or str(ready_adapter_path(Path(output)))
        )
        state, seconds = run_init(cfg, output, args.checkpoint_every, args.resume, adapter)
        print(
            f"EVA state: {len(state.ranks)} layers, {state.n_batches} batches, "
            f"{state.n_tokens} tokens, stop: {state.stop_reason}, {seconds:.1f} s -> {output}"
            + (f"; ready adapter (B = 0) -> {adapter}" if adapter else "")
        )
        from ..diagnostics import summary_lines

        for line in summary_lines(state):
            print(f"  {line}")
    elif args.command == "merge":
        from .recipes.merge import run_merge

        out = run_merge(cfg, args.adapter, args.output, args.max_shard_size)
        print(f"merged {args.adapter} into {cfg.model} -> {out}")
    elif args.command == "train":
        from .recipes.train import train

        metrics = train(cfg, evaluate=not args.no_eval)
        if "task" not in metrics:  # a rank other than 0 under torchrun: rank 0 reports
            return 0
        print(
            json.dumps(
                {k: metrics[k] for k in ("task", "init", "steps", "train_loss", "init_seconds")}
                | ({"eval": metrics["eval"]} if "eval" in metrics else {})
            )
        )
    elif args.command == "eval":
        if args.harness == "lm-eval":
            from .recipes.harness import run_harness

            print(json.dumps(run_harness(cfg, args.adapter, args.output)["metrics"]))
        else:
            from .recipes.evaluate import run_eval

            print(json.dumps(run_eval(cfg, args.adapter, args.output)["metrics"]))
    elif args.command == "compare":
        from .recipes.compare import run_compare, to_markdown

        result = run_compare(
            cfg,
            [v.strip() for v in args.inits.split(",") if v.strip()],
            _ints(args.seeds, "--seeds"),
            _floats(args.lr, "--lr") if args.lr else None,
        )
        print(to_markdown(result["summary"]), end="")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plots import (
        plot_convergence,
        plot_diagnostics,
        plot_loss_curves,
        plot_rank_heatmap,
        plot_ranks,
    )

    if not args.state and not args.compare and not args.adapter:
        raise ValueError("plot needs --state, --adapter and/or --compare")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, expected a folder for the PNG files")
    from .recipes.runtime import require_writable

    require_writable(out)
    if args.adapter:
        from ..model_card import STATE_SUBDIR, adapter_ranks

        if (Path(args.adapter) / STATE_SUBDIR).is_dir():
            args.state = str(Path(args.adapter) / STATE_SUBDIR)
        else:
            print(
                plot_ranks(
                    adapter_ranks(args.adapter), out / "ranks.png", f"LoRA ranks of {args.adapter}"
                )
            )
            print(f"no EVA state in {args.adapter} (not saved by eva-lora): convergence not drawn")
    if args.state:
        from ..state import EvaState

        state = EvaState.load(args.state)
        print(plot_rank_heatmap(state, out / "ranks.png"))
        print(plot_convergence(state, out / "convergence.png"))
        print(plot_diagnostics(state, out / "diagnostics.png"))
    if args.compare:
        source = Path(args.compare) / "comparison.json"
        if not source.is_file():
            raise ValueError(f"{source} not found: run eva compare first")
        runs = json.loads(source.read_text())["runs"]
        logs = {
            f"{init} seed{r['seed']}": r["log"] for init, results in runs.items() for r in results
        }
        print(plot_loss_curves(logs, out / "loss.png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import missing_extras

    missing = missing_extras()
    if missing:
        print(
            f"eva: the command line needs the recipes extra (missing: {', '.join(missing)}): "
            "pip install 'eva-lora[recipes]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from ..engine import EvaNotConvergedError
    from ..state import StateFileError
    from .models import ModelPathError
    from .tasks import DataError

    parser = build_parser()
    # key=value overrides may come anywhere, also after flags
    # (argparse alone stops at the first flag)
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return run(args)
    except (ValueError, DataError, ModelPathError, StateFileError, FileNotFoundError) as err:
        print(f"eva {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except EvaNotConvergedError as err:  # strict=true: the work ran, its result is not accepted
        print(f"eva {args.command}: error: {err}", file=sys.stderr)
        return EXIT_NOT_CONVERGED


if __name__ == "__main__":
    sys.exit(main())

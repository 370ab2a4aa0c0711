"""Adapters that explain themselves: a Hugging Face model card and the EVA state beside the weights.

``save_adapter`` writes a PEFT adapter folder the usual way (``PeftModel.from_pretrained`` loads it)
and adds ``README.md`` (base model, task, init method, EVA settings, ranks per layer type, stop
reason, tokens seen, library versions) and, for EVA inits, ``eva_state/`` so that ranks and
convergence can be drawn from the adapter folder alone (``eva plot --adapter DIR``). The folder is
assembled under a temporary name and swapped in, so a crash never leaves half an adapter, and it
gets the permissions of a plain ``mkdir`` under the user's umask.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn

from .diagnostics import summary_lines
from .files import atomic_write_text, umask_mode
from .loop_utils import versions
from .state import STATE_DIR, EvaState

# Our inits never change the base vocabulary or embeddings, but PEFT's
# save_embedding_layers="auto" copies the whole embedding matrix into the
# adapter whenever the LM head is a target (130 of 136 MB for SmolLM2).
NO_EMBEDDING_COPY = {"save_embedding_layers": False}

STATE_SUBDIR = STATE_DIR  # the adapter folder keeps its EVA state here
CARD = "README.md"
# the base model's fingerprint: `eva eval` refuses an adapter for another model
MANIFEST = "eva_manifest.json"
# what an adapter is checked on
MODEL_IDENTITY = ("architecture", "model_type", "parameters", "shapes_sha256")


def rank_summary(ranks: dict[str, int]) -> list[tuple[str, int, int, float, int]]:
    """(layer type, layers, min, mean, max) of the ranks per module type (``q_proj``, ...)."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for name, rank in ranks.items():
        by_kind[re.sub(r"^.*?\.\d+\.", "", name)].append(rank)
    return [(kind, len(v), min(v), sum(v) / len(v), max(v)) for kind, v in sorted(by_kind.items())]


def check_adapter_model(adapter: str | os.PathLike[str], model: Any, force: bool = False) -> None:
    """Refuse an adapter saved for another base model (its ``eva_manifest.json`` says which), unless
    ``force``. Adapters saved without a manifest (by PEFT itself) are taken as they are."""
    from .fingerprints import differences, model_fingerprint

    path = Path(adapter) / MANIFEST
    if force or not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable adapter manifest: {err}") from None
    actual = model_fingerprint(model)
    changed = differences(recorded, {k: actual.get(k) for k in MODEL_IDENTITY})
    if changed:
        raise ValueError(
            f"the adapter {adapter} was trained on another base model ({'; '.join(changed[:2])}); "
            "evaluate it with its own base model, or pass force=true to load it anyway"
        )


def model_card_text(state: EvaState | None, info: dict[str, Any]) -> str:
    """The README.md of an adapter folder (YAML front matter as the Hub expects, then a summary)."""
    base = info.get("base_model", "unknown")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags:",
        "- lora",
        "- eva",
        "- eva-lora",
        "---",
        "",
        f"# LoRA adapter for {base}",
        "",
    ]
    facts = {
        "task": info.get("task"),
        "init method": info.get("init"),
        "seed": info.get("seed"),
        "training steps": info.get("steps"),
        "final training loss": info.get("train_loss"),
    }
    lines += [f"- **{k}**: {v}" for k, v in facts.items() if v is not None]
    if state is not None:
        cfg = state.config
        lines += [
            "",
            "## EVA initialisation",
            "",
            f"- r {cfg.rank}, rho {cfg.rho}, tau {cfg.tau}, delta {cfg.delta}, rank metric "
            f"{cfg.rank_metric}, "
            f"label mask {cfg.use_label_mask}, whiten {cfg.whiten}, init mode {cfg.init_mode}",
            f"- statistics: {', '.join(sorted(set(state.group_statistics or ['exact'])))} "
            f"(sketch size {cfg.resolved_sketch_size})",
            f"- stop reason: {state.stop_reason} after {state.n_batches} batches, "
            f"{state.n_tokens} tokens (most in one layer group)",
            f"- layers not converged: {len(state.unconverged)}",
            f"- rank budget {sum(state.ranks.values())} over {len(state.ranks)} layers "
            f"({sum(r == 0 for r in state.ranks.values())} with rank 0)",
            "",
            "| layer type | layers | min rank | mean rank | max rank |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {n} | {lo} | {mean:.1f} | {hi} |"
            for k, n, lo, mean, hi in rank_summary(state.ranks)
        ]
        lines += ["", "Diagnostics:", ""] + [f"- {line}" for line in summary_lines(state)]
        lines += [
            "",
            f"`{STATE_SUBDIR}/` holds the full EVA state (components, spectra, convergence "
            "history): `eva plot --adapter .` draws it.",
        ]
    used = {**versions(), **(state.versions if state is not None else {})}
    lines += ["", "## Made with", "", ", ".join(f"{k} {v}" for k, v in sorted(used.items())), ""]
    return "\n".join(lines)


def save_adapter(
    peft_model: Any,
    directory: str | os.PathLike[str],
    state: EvaState | None = None,
    info: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save ``peft_model`` to ``directory`` with its model card and EVA state, atomically.

    ``info``: what the card should say (base_model, task, init, seed, steps, train_loss).
    ``model``: the base model's :func:`~eva_lora.fingerprints.model_fingerprint`, taken before any
    init rewrote its weights; its identity (:data:`MODEL_IDENTITY`) is kept in
    ``eva_manifest.json``. ``save_kwargs`` go to ``save_pretrained`` (e.g.
    ``path_initial_model_for_weight_conversion``). The embeddings are not copied into the adapter
    (``NO_EMBEDDING_COPY``): pass ``save_embedding_layers=True`` if you resized the vocabulary or
    trained the embeddings in full.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    save_kwargs = {**NO_EMBEDDING_COPY, **save_kwargs}
    try:
        peft_model.save_pretrained(tmp, **save_kwargs)
        if save_kwargs.get("path_initial_model_for_weight_conversion"):
            _restore_tensors_the_conversion_drops(
                peft_model, tmp, save_kwargs["save_embedding_layers"]
            )
        if state is not None:
            state.save(tmp / STATE_SUBDIR)
        info = dict(info or {})
        info.setdefault(
            "base_model",
            getattr(
                getattr(peft_model, "peft_config", {}).get("default"),
                "base_model_name_or_path",
                None,
            )
            or "unknown",
        )
        atomic_write_text(tmp / CARD, model_card_text(state, info))
        if model is not None:
            identity = {k: model.get(k) for k in MODEL_IDENTITY}
            atomic_write_text(
                tmp / MANIFEST,
                json.dumps({"format": "eva-lora-adapter", "model": identity}, indent=2),
            )
        _chmod_tree(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _restore_tensors_the_conversion_drops(
    peft_model: Any, folder: Path, save_embedding_layers: Any
) -> None:
    """PEFT's PiSSA-like conversion writes only ``lora_A`` / ``lora_B`` (``subtract_mutated_init``):
    the trained ``modules_to_save`` (a classification head) would be lost, and the adapter would
    load with the base model's untrained head. Put every other tensor of the adapter back into the
    file."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    converted = load_file(path)
    whole = get_peft_model_state_dict(peft_model, save_embedding_layers=save_embedding_layers)
    others = {
        k: v.detach().cpu().contiguous()
        for k, v in whole.items()
        if "lora_A" not in k and "lora_B" not in k and k not in converted
    }
    if others:
        save_file({**converted, **others}, path, metadata={"format": "pt"})


def _chmod_tree(root: Path) -> None:
    """Give a temporary folder (0700) and what is in it the modes of a plain mkdir / open."""
    os.chmod(root, umask_mode(directory=True))
    for path in root.rglob("*"):
        os.chmod(path, umask_mode(directory=path.is_dir()))


def adapter_ranks(directory: str | os.PathLike[str]) -> dict[str, int]:
    """Layer name -> LoRA rank, from a PEFT adapter folder's weight shapes (ours or PEFT's EVA)."""
    from safetensors import safe_open

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a PEFT adapter folder")
    ranks = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            match = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_A(?:\.[^.]+)?\.weight$", key)
            if match:
                ranks[match.group(1)] = int(handle.get_slice(key).get_shape()[0])
    if not ranks:
        raise ValueError(f"{path} holds no LoRA A weights")
    return ranks


def save_ready_adapter(
    model: nn.Module,
    state: EvaState,
    directory: str | os.PathLike[str],
    *,
    lora_alpha: float = 1.0,
    info: dict[str, Any] | None = None,
    fingerprint: dict[str, Any] | None = None,
    **lora_kwargs: Any,
) -> Path:
    """An untrained PEFT LoRA adapter for ``model`` (A = EVA's components, B = 0), card and state.

    Any LoRA tool that starts from an existing PEFT adapter (``PeftModel.from_pretrained(base, dir,
    is_trainable=True)``, axolotl's ``lora_model_dir``, LLaMA-Factory's ``adapter_name_or_path``)
    then trains from EVA without knowing about it. ``model`` is left as it was: the LoRA layers are
    added, saved and removed again. A model whose weights are on the meta device (sequential EVA
    from disk) works too: only the small LoRA tensors are materialised."""
    from .peft_bridge import apply_eva_state

    peft_model = apply_eva_state(model, state, lora_alpha, **lora_kwargs)
    try:
        # on a meta-device base the LoRA layers were built there too: give them storage
        materialised = False
        for module in peft_model.modules():
            for part in ("lora_A", "lora_B"):
                layers = getattr(module, part, None)
                if isinstance(layers, nn.ModuleDict):
                    for layer in layers.values():
                        if any(p.is_meta for p in layer.parameters()):
                            layer.to_empty(device="cpu")
                            materialised = True
        if materialised:  # apply_eva_state's writes went to meta tensors
            from .peft_bridge import write_eva_weights

            write_eva_weights(peft_model, state)
        return save_adapter(peft_model, directory, state, info, model=fingerprint)
    finally:
        peft_model.unload()  # the base model without LoRA layers, as it came

"""EvaState: the result of an EVA run, and its file format (safetensors + JSON, never pickle).

On disk a state is a directory with ``eva_state.safetensors`` (per group: components,
eigenvalues, explained-variance ratios) and ``eva_state.json`` (everything else plus the
SHA-256 of the tensor file). The JSON is written last, so its presence commits the pair, and the
hash detects a truncated or swapped tensor file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._atomic import atomic_path, atomic_write_text
from .config import EvaConfig
from .files import StateFileError, read_json_manifest, read_safetensors, sha256_file
from .lora_init import initial_lora_a

FORMAT = "eva-lora-state"
FORMAT_VERSION = 1
TENSOR_FILE = "eva_state.safetensors"
META_FILE = "eva_state.json"
PEFT_PREFIX = "base_model.model."


@dataclass
class EvaState:
    """Components, spectra, ranks and provenance of one EVA initialisation.

    Layers that received the same input share a group (and its tensors); ``components`` and the
    other per-layer views slice the group tensors without copying.
    """

    config: EvaConfig
    groups: list[list[str]]
    group_components: list[torch.Tensor]  # (k_g, in_features) float32 rows, largest variance first
    group_eigenvalues: list[torch.Tensor]  # (k_g,) float64 covariance eigenvalues
    group_ratios: list[torch.Tensor]  # (k_g,) float64 explained-variance ratios
    group_tokens: list[int]
    ranks: dict[str, int]
    layer_shapes: dict[str, list[int]]  # name -> [in_features, out_features]
    n_batches: int = 0
    stop_reason: str = "unknown"
    unconverged: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    group_statistics: list[str] = field(default_factory=list)  # statistic kind per group: exact | sketch
    group_stop_batches: list[int | None] = field(default_factory=list)  # batch a group met the rule (None: never)

    # ---- per-layer views -------------------------------------------------------------------
    def _group_index(self) -> dict[str, int]:
        return {name: g for g, names in enumerate(self.groups) for name in names}

    @property
    def components(self) -> dict[str, torch.Tensor]:
        """name -> (ranks[name], in_features): the rows that initialise LoRA's A."""
        index = self._group_index()
        return {n: self.group_components[index[n]][:r] for n, r in self.ranks.items()}

    @property
    def eigenvalues(self) -> dict[str, torch.Tensor]:
        index = self._group_index()
        return {n: self.group_eigenvalues[index[n]] for n in self.ranks}

    @property
    def explained_variance_ratio(self) -> dict[str, torch.Tensor]:
        index = self._group_index()
        return {n: self.group_ratios[index[n]] for n in self.ranks}

    @property
    def singular_values(self) -> dict[str, torch.Tensor]:
        """Singular values of the centred activations: ``sqrt(eigenvalue * (tokens - 1))``."""
        index = self._group_index()
        return {n: (self.group_eigenvalues[index[n]].clamp_min(0) * (self.group_tokens[index[n]] - 1)).sqrt()
                for n in self.ranks}

    @property
    def n_tokens(self) -> int:
        return max(self.group_tokens, default=0)

    @property
    def model_fingerprint(self) -> str:
        return model_fingerprint(self.layer_shapes)

    # ---- files -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the state atomically into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for g in range(len(self.groups)):
            tensors[f"group.{g}.components"] = self.group_components[g].detach().to("cpu", torch.float32).contiguous()
            tensors[f"group.{g}.eigenvalues"] = self.group_eigenvalues[g].detach().to("cpu", torch.float64).contiguous()
            tensors[f"group.{g}.ratios"] = self.group_ratios[g].detach().to("cpu", torch.float64).contiguous()
        with atomic_path(directory / TENSOR_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        meta = self._metadata(sha256_file(directory / TENSOR_FILE))
        meta["meta_sha256"] = _meta_digest(meta)
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1, allow_nan=True))
        return directory

    def _metadata(self, digest: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tensors_sha256": digest,
            "config": self.config.to_dict(),
            "groups": [{"layers": names, "tokens": t, "statistic": kind, "stop_batch": stop}
                       for names, t, kind, stop in zip(self.groups, self.group_tokens, self._kinds(),
                                                       self._stop_batches())],
            "ranks": self.ranks,
            "layer_shapes": self.layer_shapes,
            "model_fingerprint": self.model_fingerprint,
            "n_batches": self.n_batches,
            "stop_reason": self.stop_reason,
            "unconverged": self.unconverged,
            "history": self.history,
            "versions": self.versions,
        }

    def _kinds(self) -> list[str]:
        return self.group_statistics or ["exact"] * len(self.groups)

    def _stop_batches(self) -> list[int | None]:
        return self.group_stop_batches or [None] * len(self.groups)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> EvaState:
        """Read and validate a state written by :meth:`save`."""
        directory = Path(directory)
        meta = _read_meta(directory)
        tensor_path = directory / TENSOR_FILE
        if not tensor_path.is_file():
            raise StateFileError(f"{tensor_path} is missing")
        if sha256_file(tensor_path) != meta.get("tensors_sha256"):
            raise StateFileError(f"{tensor_path} does not match its checksum in {META_FILE} (truncated or replaced)")
        try:
            config = EvaConfig.from_dict(meta["config"])
            groups = [list(g["layers"]) for g in meta["groups"]]
            tokens = [int(g["tokens"]) for g in meta["groups"]]
            kinds = [str(g.get("statistic", "exact")) for g in meta["groups"]]
            stops = [None if g.get("stop_batch") is None else int(g["stop_batch"]) for g in meta["groups"]]
            ranks = {str(k): int(v) for k, v in meta["ranks"].items()}
            shapes = {str(k): [int(x) for x in v] for k, v in meta["layer_shapes"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise StateFileError(f"{directory / META_FILE} is not a valid EVA state: {err}") from err
        comps, values, ratios = _read_tensors(tensor_path, len(groups))
        state = cls(config, groups, comps, values, ratios, tokens, ranks, shapes,
                    n_batches=int(meta.get("n_batches", 0)), stop_reason=str(meta.get("stop_reason", "unknown")),
                    unconverged=list(meta.get("unconverged", [])), history=list(meta.get("history", [])),
                    versions=dict(meta.get("versions", {})), group_statistics=kinds, group_stop_batches=stops)
        state.validate()
        return state

    def validate(self) -> None:
        """Raise :class:`StateFileError` when the parts of the state disagree with each other."""
        members = [n for names in self.groups for n in names]
        if len(members) != len(set(members)) or set(members) != set(self.ranks):
            raise StateFileError("groups and ranks name different layers")
        for g, names in enumerate(self.groups):
            comp = self.group_components[g]
            k = comp.shape[0]
            if comp.ndim != 2 or self.group_eigenvalues[g].shape != (k,) or self.group_ratios[g].shape != (k,):
                raise StateFileError(f"group {g} ({names[0]}): inconsistent tensor shapes")
            if not torch.isfinite(comp).all():
                raise StateFileError(f"group {g} ({names[0]}): components contain NaN or Inf")
            for name in names:
                if self.layer_shapes.get(name, [None])[0] != comp.shape[1]:
                    raise StateFileError(f"layer {name}: components have width {comp.shape[1]}, "
                                         f"layer_shapes says {self.layer_shapes.get(name)}")
                if not 0 <= self.ranks[name] <= k:
                    raise StateFileError(f"layer {name}: rank {self.ranks[name]} outside [0, {k}]")

    # ---- PEFT interop ----------------------------------------------------------------------
    def to_peft_state_dict(self, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
        """The dict ``peft.initialize_lora_eva_weights(model, eva_state_dict=...)`` accepts.

        Keys are PeftModel module names (``prefix`` + base name); values are the initial A rows
        (whitened / ablated as this state's config says), one per layer with rank > 0.
        """
        return {prefix + name: a for name, a in initial_lora_a(self).items()}

    @classmethod
    def from_peft_state_dict(cls, state_dict: dict[str, torch.Tensor], config: EvaConfig | None = None,
                             layer_shapes: dict[str, list[int]] | None = None) -> EvaState:
        """Wrap PEFT's ``get_eva_state_dict`` output; spectra are unknown and stored as NaN.

        Each layer becomes its own group and its rank is its number of rows. ``layer_shapes``
        (name -> [in, out]) makes the state checkable against a model; without it the output
        width is recorded as -1.
        """
        if not state_dict:
            raise ValueError("the PEFT EVA state dict is empty")
        names, comps = [], []
        for key, rows in state_dict.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            names.append(name)
            comps.append(rows.detach().to("cpu", torch.float32).reshape(-1, rows.shape[-1]))
        config = config or EvaConfig(rank=max(1, round(sum(c.shape[0] for c in comps) / len(comps))), whiten=False)
        nan = [torch.full((c.shape[0],), math.nan, dtype=torch.float64) for c in comps]
        shapes = layer_shapes or {n: [c.shape[1], -1] for n, c in zip(names, comps)}
        return cls(config, [[n] for n in names], comps, nan, [v.clone() for v in nan], [0] * len(names),
                   {n: c.shape[0] for n, c in zip(names, comps)}, shapes, stop_reason="imported_from_peft")


def model_fingerprint(layer_shapes: dict[str, list[int]]) -> str:
    """SHA-256 over sorted ``name:in:out`` lines of the adapted layers."""
    text = "\n".join(f"{n}:{s[0]}:{s[1]}" for n, s in sorted(layer_shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata's canonical JSON (without this digest): an edited JSON is refused too."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    meta = read_json_manifest(path, FORMAT, FORMAT_VERSION, "an eva-lora state directory")
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise StateFileError(f"{path} does not match its own checksum (edited or corrupted)")
    return meta


def _read_tensors(path: Path, n_groups: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    expected = {"components": torch.float32, "eigenvalues": torch.float64, "ratios": torch.float64}
    tensors = read_safetensors(path, finite=False)  # spectra of a state imported from PEFT are NaN
    out: dict[str, list[torch.Tensor]] = {k: [] for k in expected}
    for g in range(n_groups):
        for kind, dtype in expected.items():
            key = f"group.{g}.{kind}"
            if key not in tensors:
                raise StateFileError(f"{path}: tensor {key} is missing")
            if tensors[key].dtype != dtype:
                raise StateFileError(f"{path}: tensor {key} has dtype {tensors[key].dtype}, expected {dtype}")
            out[kind].append(tensors[key])
    return out["components"], out["eigenvalues"], out["ratios"]

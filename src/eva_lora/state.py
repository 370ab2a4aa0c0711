"""EvaState: the result of an EVA run, and its file format (safetensors + JSON, never pickle).

On disk a state is a directory with ``eva_state.safetensors`` (per group: components,
eigenvalues, explained-variance ratios) and ``eva_state.json`` (everything else plus the
SHA-256 of the tensor file). The JSON is written last, so its presence commits the pair, and the
hash detects a truncated or swapped tensor file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import EvaConfig
from .files import StateFileError, read_pair, write_pair

FORMAT = "eva-lora-state"
FORMAT_VERSION = 1
TENSOR_FILE = "eva_state.safetensors"
META_FILE = "eva_state.json"
STATE_DIR = "eva_state"  # the folder a state is saved to inside a run or adapter folder
DIGEST_KEY = "meta_sha256"  # the manifest's SHA-256 of its own content


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
    # statistic kind per group: exact | sketch
    group_statistics: list[str] = field(default_factory=list)
    # batch a group met the rule (None: never)
    group_stop_batches: list[int | None] = field(default_factory=list)
    # half-data agreement (diagnostics.py)
    group_stability: list[float | None] = field(default_factory=list)
    # tokens the masks saw and kept (diagnostics.py)
    token_counts: dict[str, int] = field(default_factory=dict)

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
        return {
            n: (
                self.group_eigenvalues[index[n]].clamp_min(0) * (self.group_tokens[index[n]] - 1)
            ).sqrt()
            for n in self.ranks
        }

    @property
    def n_tokens(self) -> int:
        return max(self.group_tokens, default=0)

    @property
    def model_fingerprint(self) -> str:
        return model_fingerprint(self.layer_shapes)

    # ---- files -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the state atomically to ``directory`` (made if needed): tensors, then manifest."""
        directory = Path(directory)
        tensors = {}
        for g in range(len(self.groups)):
            tensors[f"group.{g}.components"] = (
                self.group_components[g].detach().to("cpu", torch.float32)
            )
            tensors[f"group.{g}.eigenvalues"] = (
                self.group_eigenvalues[g].detach().to("cpu", torch.float64)
            )
            tensors[f"group.{g}.ratios"] = self.group_ratios[g].detach().to("cpu", torch.float64)
        write_pair(
            directory / TENSOR_FILE,
            tensors,
            directory / META_FILE,
            self._metadata(),
            format_name=FORMAT,
            version=FORMAT_VERSION,
            digest_key=DIGEST_KEY,
        )
        return directory

    def _metadata(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "groups": [
                {
                    "layers": names,
                    "tokens": t,
                    "statistic": kind,
                    "stop_batch": stop,
                    "agreement": agree,
                }
                for names, t, kind, stop, agree in zip(
                    self.groups,
                    self.group_tokens,
                    self._kinds(),
                    self._stop_batches(),
                    self._stability(),
                )
            ],
            "token_counts": self.token_counts,
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

    def _stability(self) -> list[float | None]:
        return self.group_stability or [None] * len(self.groups)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> EvaState:
        """Read and validate a state written by :meth:`save`."""
        directory = Path(directory)
        meta, tensors = read_pair(
            directory / META_FILE,
            format_name=FORMAT,
            version=FORMAT_VERSION,
            what="an eva-lora state directory",
            finite=False,
            digest_key=DIGEST_KEY,
            # spectra of a state imported from PEFT are NaN
            tensor_file=TENSOR_FILE,
        )
        try:
            config = EvaConfig.from_dict(meta["config"])
            groups = [list(g["layers"]) for g in meta["groups"]]
            tokens = [int(g["tokens"]) for g in meta["groups"]]
            kinds = [str(g.get("statistic", "exact")) for g in meta["groups"]]
            stops = [
                None if g.get("stop_batch") is None else int(g["stop_batch"])
                for g in meta["groups"]
            ]
            agreement = [
                None if g.get("agreement") is None else float(g["agreement"])
                for g in meta["groups"]
            ]
            counts = {str(k): int(v) for k, v in (meta.get("token_counts") or {}).items()}
            ranks = {str(k): int(v) for k, v in meta["ranks"].items()}
            shapes = {str(k): [int(x) for x in v] for k, v in meta["layer_shapes"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise StateFileError(
                f"{directory / META_FILE} is not a valid EVA state: {err}"
            ) from err
        comps, values, ratios = _group_tensors(tensors, directory / TENSOR_FILE, len(groups))
        state = cls(
            config=config,
            groups=groups,
            group_components=comps,
            group_eigenvalues=values,
            group_ratios=ratios,
            group_tokens=tokens,
            ranks=ranks,
            layer_shapes=shapes,
            n_batches=int(meta.get("n_batches", 0)),
            stop_reason=str(meta.get("stop_reason", "unknown")),
            unconverged=list(meta.get("unconverged", [])),
            history=list(meta.get("history", [])),
            versions=dict(meta.get("versions", {})),
            group_statistics=kinds,
            group_stop_batches=stops,
            group_stability=agreement,
            token_counts=counts,
        )
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
            if (
                comp.ndim != 2
                or self.group_eigenvalues[g].shape != (k,)
                or self.group_ratios[g].shape != (k,)
            ):
                raise StateFileError(f"group {g} ({names[0]}): inconsistent tensor shapes")
            if not torch.isfinite(comp).all():
                raise StateFileError(f"group {g} ({names[0]}): components contain NaN or Inf")
            for name in names:
                if self.layer_shapes.get(name, [None])[0] != comp.shape[1]:
                    raise StateFileError(
                        f"layer {name}: components have width {comp.shape[1]}, "
                        f"layer_shapes says {self.layer_shapes.get(name)}"
                    )
                if not 0 <= self.ranks[name] <= k:
                    raise StateFileError(f"layer {name}: rank {self.ranks[name]} outside [0, {k}]")


def state_bytes(widths: list[int], components: int) -> int:
    """Upper bound of a saved state's size: per layer, ``components`` float32 rows of its width and
    two float64 spectra (one group per layer; shared groups only make it smaller), plus 1 MiB of
    JSON."""
    return sum(w * components * 4 + 2 * components * 8 for w in widths) + (1 << 20)


def model_fingerprint(layer_shapes: dict[str, list[int]]) -> str:
    """SHA-256 over sorted ``name:in:out`` lines of the adapted layers."""
    text = "\n".join(f"{n}:{s[0]}:{s[1]}" for n, s in sorted(layer_shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _group_tensors(
    tensors: dict[str, torch.Tensor], path: Path, n_groups: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    expected = {"components": torch.float32, "eigenvalues": torch.float64, "ratios": torch.float64}
    out: dict[str, list[torch.Tensor]] = {k: [] for k in expected}
    for g in range(n_groups):
        for kind, dtype in expected.items():
            key = f"group.{g}.{kind}"
            if key not in tensors:
                raise StateFileError(f"{path}: tensor {key} is missing")
            if tensors[key].dtype != dtype:
                raise StateFileError(
                    f"{path}: tensor {key} has dtype {tensors[key].dtype}, expected {dtype}"
                )
            out[kind].append(tensors[key])
    return out["components"], out["eigenvalues"], out["ratios"]

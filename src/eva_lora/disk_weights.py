"""A model's weights read from safetensors one module at a time (sequential EVA's onloading).

Sequential EVA needs one decoder block in memory at a time. The model is built on the meta device
(shapes, no storage), and :class:`DiskWeights` reads the tensors of one module from the checkpoint
when it is needed and drops them afterwards: ``safe_open`` maps the file, so only the tensors asked
for are read. Parameters shared by several modules (tied input and output embeddings) are read once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


class DiskWeights:
    """Tensors of a safetensors checkpoint (``model.safetensors`` or a sharded index) by name."""

    def __init__(self, folder: str | os.PathLike[str], dtype: torch.dtype | None = None) -> None:
        self.folder, self.dtype = Path(folder), dtype
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            self.files = {
                k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()
            }
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), single)
        else:
            raise ValueError(
                f"{self.folder} has no model.safetensors (or model.safetensors.index.json): "
                "sequential EVA reads the weights block by block from safetensors files"
            )
        # id(meta parameter) -> its loaded tensor (tied weights)
        self._shared: dict[int, nn.Parameter] = {}

    def load(
        self,
        root: nn.Module,
        module: nn.Module,
        prefix: str,
        device: torch.device,
        recurse: bool = True,
    ) -> None:
        """Fill ``module``'s meta parameters (its own; all with ``recurse``) from the checkpoint."""
        aliases = _aliases(root)
        from safetensors import safe_open

        for name, param in list(module.named_parameters(recurse=recurse, remove_duplicate=False)):
            if param.device.type != "meta":
                continue
            full = f"{prefix}.{name}" if prefix else name
            loaded = self._shared.get(id(param))
            if loaded is None:
                key = next(
                    (k for k in [full, *aliases.get(id(param), [])] if k in self.files), None
                )
                if key is None:
                    raise ValueError(f"the checkpoint in {self.folder} has no tensor for {full}")
                with safe_open(str(self.files[key]), framework="pt", device="cpu") as handle:
                    tensor = handle.get_tensor(key)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{key} in {self.folder} has shape {tuple(tensor.shape)}, the model "
                        f"expects {tuple(param.shape)}"
                    )
                tensor = tensor.to(device=device, dtype=self.dtype or param.dtype)
                loaded = nn.Parameter(tensor, requires_grad=False)
                if len(aliases.get(id(param), [])) > 1:
                    self._shared[id(param)] = loaded
            _set(module, name, loaded)

    def release(self, module: nn.Module) -> None:
        """Back to the meta device: the block's memory is freed, its shapes stay."""
        for name, param in list(module.named_parameters(remove_duplicate=False)):
            _set(
                module,
                name,
                nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False),
            )


def _aliases(root: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _set(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[attr] = value


def empty_model_from_folder(
    folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32, kind: str = "generation"
) -> tuple[nn.Module, DiskWeights]:
    """(model on the meta device, its weights on disk) for a transformers checkpoint folder.

    Only shapes are allocated (``accelerate.init_empty_weights``: buffers such as rotary frequencies
    stay real), so a model larger than the machine's memory can be passed to sequential EVA."""
    try:
        from accelerate import init_empty_weights
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )
    except ImportError as err:
        raise ImportError(
            "loading a model without its weights needs transformers and accelerate: "
            "pip install 'eva-lora[recipes]'"
        ) from err
    weights = DiskWeights(folder, dtype)
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForCausalLM if kind == "generation" else AutoModelForSequenceClassification
    with init_empty_weights():
        model = auto.from_config(config, dtype=dtype)
    model.tie_weights()  # tied embeddings become one parameter, read once under its checkpoint name
    model.eval()
    return model, weights

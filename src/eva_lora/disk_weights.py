"""A model's weights read from safetensors one module at a time (sequential EVA's onloading).

Sequential EVA needs one decoder block in memory at a time. The model is built on the meta device
(shapes, no storage), and :class:`DiskWeights` reads the tensors of one module from the checkpoint
when it is needed and drops them afterwards: ``safe_open`` maps the file, so only the tensors asked
for are read. Parameters shared by several modules (tied input and output embeddings) are read once.

A 4-bit (QLoRA) base is built the same way: ``empty_model_from_folder(..., load_in_4bit="nf4")``
swaps the linear layers for bitsandbytes ``Linear4bit`` ones through transformers' own quantizer
(the same layers, skipped modules and settings as ``from_pretrained(quantization_config=...)``),
and each block's float weights are quantised as they are read, on the compute device. The base
therefore never sits whole in memory, not even in 4 bits, and EVA sees exactly the activations of
the base QLoRA will train on.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

# what bitsandbytes saves beside a 4-bit weight ``<name>`` (as ``<name><suffix>``)
QUANT_STATE_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)


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
        # a bitsandbytes 4-bit checkpoint: weight name -> the names of its quantisation state
        self._quant_state: dict[str, list[str]] = {}
        for key in self.files:
            for suffix in QUANT_STATE_SUFFIXES:
                if key.endswith(suffix):
                    self._quant_state.setdefault(key[: -len(suffix)], []).append(key)
        # id(meta parameter) -> its loaded tensor (tied weights)
        self._shared: dict[int, nn.Parameter] = {}
        # id(loaded tensor) -> [the meta parameter it replaced, how many modules hold it]: put back
        # on release, so a 4-bit weight (stored packed once quantised) gets its shape and
        # quantisation settings back, and tied modules released one after the other stay tied
        self._meta: dict[int, list[Any]] = {}

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
                tensor = self._read(key)
                if _from_conv1d(module, name) and key not in self._quant_state:
                    tensor = tensor.T  # GPT-2's Conv1D stores (in, out); Linear4bit (out, in)
                if key in self._quant_state:  # packed 4 bits, saved by bitsandbytes
                    stats = {k[len(key) + 1 :]: self._read(k) for k in self._quant_state[key]}
                    loaded = _prequantised(param, tensor, stats, device, key)
                elif tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{key} in {self.folder} has shape {tuple(tensor.shape)}, the model "
                        f"expects {tuple(param.shape)}"
                    )
                else:
                    loaded = _materialise(param, tensor, device, self.dtype)
                if len(aliases.get(id(param), [])) > 1:
                    self._shared[id(param)] = loaded
            holders = self._meta.setdefault(id(loaded), [param, 0])
            holders[1] += 1
            _set(module, name, loaded)

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)

    def release(self, module: nn.Module, recurse: bool = True) -> None:
        """Back to the meta device: the module's memory is freed (its own parameters only without
        ``recurse``), its shapes stay. A tied parameter is read again when next asked for."""
        for name, param in list(module.named_parameters(recurse=recurse, remove_duplicate=False)):
            if param.is_meta:
                continue
            holders = self._meta.get(id(param))
            if holders is None:
                meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            else:
                meta, holders[1] = holders[0], holders[1] - 1
                if holders[1] == 0:  # no other module holds it: forget it
                    del self._meta[id(param)]
                    if self._shared.get(id(meta)) is param:
                        del self._shared[id(meta)]
            owner, _ = _owner(module, name)
            if getattr(owner, "quant_state", None) is not None:
                # bitsandbytes keeps the 4-bit state on the layer too: it leaves with the weight
                owner.quant_state = None
            _set(module, name, meta)


def _from_conv1d(module: nn.Module, name: str) -> bool:
    """The parameter is a 4-bit layer's weight that transformers made from a GPT-2 style
    ``Conv1D`` (``source_cls``), whose checkpoint tensor is transposed."""
    source = getattr(_owner(module, name)[0], "source_cls", None)
    if not isinstance(source, type) or not name.endswith("weight"):
        return False
    from transformers.pytorch_utils import Conv1D

    return issubclass(source, Conv1D)


def _prequantised(
    meta: nn.Parameter,
    packed: torch.Tensor,
    stats: dict[str, torch.Tensor],
    device: torch.device,
    key: str,
) -> nn.Parameter:
    """A 4-bit weight saved by bitsandbytes (packed data and its quantisation state), as
    transformers' loader rebuilds it (``Params4bit.from_prequantized``)."""
    if type(meta).__name__ != "Params4bit":
        raise ValueError(
            f"{key} is stored in 4 bits, but the model's layer there is not a bitsandbytes "
            "4-bit one"
        )
    import bitsandbytes as bnb

    return bnb.nn.Params4bit.from_prequantized(
        data=packed, quantized_stats=stats, requires_grad=False, device=device, module=meta.module
    )


def _materialise(
    meta: nn.Parameter, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> nn.Parameter:
    """The checkpoint's tensor in place of ``meta`` on ``device``: cast to ``dtype`` (else the
    model's), or, for a bitsandbytes 4-bit weight, quantised there with the layer's settings, as
    transformers' loader does (``Params4bit(value, **meta.__dict__).to(device)``)."""
    if type(meta).__name__ == "Params4bit":
        import bitsandbytes as bnb

        source = tensor.to(dtype=dtype or tensor.dtype)
        return bnb.nn.Params4bit(source, requires_grad=False, **meta.__dict__).to(device)
    return nn.Parameter(tensor.to(device=device, dtype=dtype or meta.dtype), requires_grad=False)


def _aliases(root: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """(the submodule that holds ``dotted``, the attribute's own name)."""
    owner_name, _, attr = dotted.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), attr


def _set(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    owner, attr = _owner(module, dotted)
    owner._parameters[attr] = value


def empty_model_from_folder(
    folder: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    kind: str = "generation",
    load_in_4bit: str | None = None,
) -> tuple[nn.Module, DiskWeights]:
    """(model on the meta device, its weights on disk) for a transformers checkpoint folder.

    Only shapes are allocated (``accelerate.init_empty_weights``: buffers such as rotary frequencies
    stay real), so a model larger than the machine's memory can be passed to sequential EVA.
    ``load_in_4bit`` ("nf4" / "fp4"): a QLoRA base, quantised block by block as it is read (compute
    dtype ``dtype``); the folder holds the float checkpoint."""
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
    config = AutoConfig.from_pretrained(folder)
    quantizer = _quantizer(
        load_in_4bit, dtype, folder, getattr(config, "quantization_config", None)
    )
    weights = DiskWeights(folder, dtype)
    auto = AutoModelForCausalLM if kind == "generation" else AutoModelForSequenceClassification
    with init_empty_weights():
        model = auto.from_config(config, dtype=dtype)
        if quantizer is not None:  # nn.Linear -> Linear4bit, on the meta device
            quantizer.preprocess_model(model=model, dtype=dtype, device_map=None)
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
        model.config.quantization_config = quantizer.quantization_config
    model.tie_weights()  # tied embeddings become one parameter, read once under its checkpoint name
    model.eval()
    return model, weights


def _stored_quantization(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a checkpoint saved already quantised, or None."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    stored = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    return stored if isinstance(stored, dict) and stored else None


def _bitsandbytes_4bit(stored: dict[str, Any]) -> bool:
    return stored.get("quant_method") == "bitsandbytes" and bool(stored.get("load_in_4bit"))


def prequantized(folder: str | os.PathLike[str]) -> str | None:
    """The quantisation method of a checkpoint saved already quantised (its ``config.json`` has a
    ``quantization_config``: bitsandbytes, GPTQ, AWQ, ...), or None for a float checkpoint."""
    stored = _stored_quantization(folder)
    return None if stored is None else str(stored.get("quant_method", "quantised"))


def reads_block_by_block(folder: str | os.PathLike[str]) -> bool:
    """Whether :func:`empty_model_from_folder` can read this checkpoint a block at a time: float
    safetensors, or bitsandbytes 4-bit ones."""
    if not any(Path(folder).glob("model*.safetensors*")):
        return False
    stored = _stored_quantization(folder)
    return stored is None or _bitsandbytes_4bit(stored)


def _quantizer(
    load_in_4bit: str | None, dtype: torch.dtype, folder: str | os.PathLike[str], stored: Any
) -> Any:
    """transformers' bitsandbytes 4-bit quantizer: for a checkpoint saved in 4 bits (``stored``, its
    ``quantization_config``), or to quantise a float one (``load_in_4bit``); None for neither."""
    if stored is not None:
        stored = stored if isinstance(stored, dict) else stored.to_dict()
        method = stored.get("quant_method", "quantised")
        if not _bitsandbytes_4bit(stored):
            raise ValueError(
                f"{folder} holds a checkpoint quantised with {method}"
                f"{'' if method != 'bitsandbytes' else ' in 8 bits'}: sequential EVA reads float "
                "or bitsandbytes 4-bit safetensors block by block; point it at the float "
                "checkpoint, or load the model whole (from_pretrained) and pass it"
            )
        if load_in_4bit not in (None, stored.get("bnb_4bit_quant_type")):
            raise ValueError(
                f"{folder} is already quantised ({stored.get('bnb_4bit_quant_type')}); "
                f"load_in_4bit={load_in_4bit!r} asks for another 4-bit type"
            )
    elif load_in_4bit is None:
        return None
    elif load_in_4bit not in ("nf4", "fp4"):
        raise ValueError(f"load_in_4bit must be 'nf4' or 'fp4', got {load_in_4bit!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "a 4-bit base needs bitsandbytes (>= 0.50 also runs 4-bit layers on CPU): "
            "pip install 'bitsandbytes>=0.50'"
        )
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    if stored is not None:
        return AutoHfQuantizer.from_config(stored, pre_quantized=True)
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=load_in_4bit, bnb_4bit_compute_dtype=dtype
    )
    return AutoHfQuantizer.from_config(config, pre_quantized=False)

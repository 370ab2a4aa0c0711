"""Sequential EVA: one decoder block at a time, so a model too large for the device still gets EVA.

GPTQ calibration solved the same problem (llm-compressor's *sequential onloading*): the calibration
batches go through one block at a time. Here the batches are a fixed calibration set (the first
``calibration_batches``, consumed once); for block ``i`` each batch runs through the model with the
blocks before ``i`` *replayed*: their ``forward`` returns the output block ``i - 1`` produced for
that batch, kept in a :class:`BlockOutputs` cache (CPU memory or a folder). Block ``i`` runs for
real, its target layers feed their statistics as in the whole-model loop, its output goes to the
next cache, and a forward hook ends the pass there. Everything a block needs from the model
(attention masks, position embeddings, a per-layer sliding-window mask) is computed by the model's
own forward exactly as in a whole-model pass, so no block signature has to be known. Targets outside
the blocks (an LM head) get one last loop with every block replayed.

Only one block's weights need to be on the compute device: a block is *onloaded* before its loop
(moved there, or read from a safetensors folder by :class:`~eva_lora.disk_weights.DiskWeights`) and
*offloaded* after it. With weights read from disk, the modules outside the blocks are read when
they are first called, and the input embeddings (as large as a block or larger at a 128k
vocabulary) only for one pass that keeps their output (beside the blocks' outputs, on the CPU or
in the offload folder): later passes get it back in their place, so the embeddings, a block and
the head are never in memory together. (Later passes need it: block 0 reads it, and some
architectures feed it to every block, e.g. Gemma-3n's per-layer inputs or Zamba's skip input.)
Every group absorbs every calibration batch (the block runs on them anyway to produce the next
block's inputs; ``engine.FEED_CONVERGED``), so with the same batches and exact statistics the result
equals the whole-model loop's that consumed the same batches.
Ranks are allocated across the whole model at the end, as in the whole-model loop.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import engine
from .capture import ActivationCapture, StopForward, eager
from .config import EvaConfig
from .files import atomic_path, atomic_write_text, require_free_space
from .loop_utils import bounded_stream, eval_mode, next_batch, to_device
from .sequential_checkpoint import BlockCheckpoint, calibration_digest
from .state import EvaState
from .targets import find_target_layers, layer_shapes

# Calibration batches when none are given: each one passes through every block once and its hidden
# states are kept (batch x seq x hidden per batch), so the set is fixed and modest. The whole-model
# loop needed 42-65 passes on the real models we measured (benchmarks/README.md).
DEFAULT_CALIBRATION_BATCHES = 64
INDEX_KEY = "_eva_calibration_index"
SPACE_MARGIN = 1.1  # a folder cache must find this much more free space than its estimate


@dataclass
class SequentialOptions:
    """How sequential EVA runs (``compute_eva_state(..., sequential=SequentialOptions(...))``).

    offload: where the hidden states between blocks wait: ``"cpu"`` or a folder (a private
        subfolder is created there and removed at the end).
    calibration_batches: how many batches form the calibration set (at most ``max_batches``).
    blocks: dotted name of the ``nn.ModuleList`` of decoder blocks, when it cannot be found from
        the model's ``_no_split_modules``.
    device: where each block computes (default: the model's device, or CUDA when the model's
        weights are on disk or on the meta device and a GPU is present).
    weights: where blocks not yet in memory are read from, for a model built without its weights
        (meta device): a :class:`~eva_lora.disk_weights.DiskWeights`.
    checkpoint_dir / resume: commit every finished block there (its groups and its outputs,
        :mod:`eva_lora.sequential_checkpoint`); ``resume=True`` continues at the first unfinished
        block.
    """

    offload: str | Path = "cpu"
    calibration_batches: int | None = None
    blocks: str | None = None
    device: str | torch.device | None = None
    weights: Any = None
    checkpoint_dir: str | Path | None = None
    resume: bool = False


def find_blocks(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the model's decoder blocks.

    Found as accelerate and llm-compressor find them: the ``nn.ModuleList`` whose children are all
    of a class named in the model's ``_no_split_modules`` (the largest one when several qualify)."""
    if name is not None:
        try:
            found = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"blocks={name!r} is not a submodule of this model") from err
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(
                f"blocks={name!r} is a {type(found).__name__}, not a non-empty nn.ModuleList"
            )
        return name, found
    classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and classes
        and all(type(child).__name__ in classes for child in m)
    ]
    if not candidates:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        raise ValueError(
            "sequential EVA could not find the decoder blocks: "
            + (
                "the model declares no _no_split_modules"
                if not classes
                else f"no nn.ModuleList holds only {sorted(classes)}"
            )
            + f"; name them with blocks= (--blocks), e.g. one of {lists[:4] or ['<none found>']}"
        )
    return max(candidates, key=lambda item: len(item[1]))


class BlockOutputs:
    """What one block returned for each calibration batch, in CPU memory or in a folder.

    A block may return a tensor or a (nested) tuple / list of tensors and other values; the tensors
    are stored (safetensors files in a folder, written atomically), the structure stays in
    memory."""

    def __init__(self, folder: Path | None, count: int) -> None:
        self.folder, self.count = folder, count
        self._items: dict[int, Any] = {}
        self._checked_space = False

    def put(self, index: int, value: Any) -> None:
        tensors: list[torch.Tensor] = []
        skeleton = _flatten(value, tensors)
        tensors = [t.detach().to("cpu", copy=False).contiguous() for t in tensors]
        if self.folder is None:
            self._items[index] = (skeleton, tensors)
            return
        self._check_space(sum(t.numel() * t.element_size() for t in tensors))
        from safetensors.torch import save_file

        path = self.folder / f"{index}.safetensors"
        with atomic_path(path) as tmp:
            save_file({str(k): t for k, t in enumerate(tensors)}, str(tmp))
        self._items[index] = (skeleton, len(tensors))

    def get(self, index: int, device: torch.device) -> Any:
        skeleton, tensors = self._items[index]
        if self.folder is not None:
            from safetensors.torch import load_file

            loaded = load_file(str(self.folder / f"{index}.safetensors"))
            tensors = [loaded[str(k)] for k in range(tensors)]
        return _unflatten(skeleton, iter([t.to(device, non_blocking=True) for t in tensors]))

    def save_index(self) -> None:
        """Write the structure of every stored output (folder caches).

        The cache is complete once this file exists."""
        atomic_write_text(
            self.folder / "index.json",
            json.dumps(
                {
                    "count": self.count,
                    "items": {str(k): [_skeleton_json(v[0]), v[1]] for k, v in self._items.items()},
                }
            ),
        )

    @classmethod
    def load(cls, folder: Path) -> BlockOutputs:
        index = folder / "index.json"
        if not index.is_file():
            raise ValueError(f"{folder} holds no complete block outputs (index.json is missing)")
        data = json.loads(index.read_text(encoding="utf-8"))
        cache = cls(folder, int(data["count"]))
        cache._items = {
            int(k): (_skeleton_from_json(v[0]), int(v[1])) for k, v in data["items"].items()
        }
        cache._checked_space = True
        return cache

    def nbytes(self) -> int:
        if self.folder is not None:
            return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))
        return sum(t.numel() * t.element_size() for _, ts in self._items.values() for t in ts)

    def _check_space(self, per_batch: int) -> None:
        """Before the first file: check for twice the estimate (two blocks' caches coexist)."""
        if self._checked_space:
            return
        self._checked_space = True
        need = int(2 * per_batch * self.count * SPACE_MARGIN)
        require_free_space(
            self.folder,
            need,
            f"the hidden states of {self.count} calibration batches (point the "
            "offload at another folder, or use fewer calibration batches)",
        )


def _flatten(value: Any, out: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        out.append(value)
        return ("tensor", len(out) - 1)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, [_flatten(v, out) for v in value])
    return ("value", value)


def _skeleton_json(skeleton: Any) -> Any:
    kind, payload = skeleton
    return [kind, [_skeleton_json(s) for s in payload] if kind in ("tuple", "list") else payload]


def _skeleton_from_json(data: Any) -> Any:
    kind, payload = data
    return (
        kind,
        [_skeleton_from_json(s) for s in payload] if kind in ("tuple", "list") else payload,
    )


def _unflatten(skeleton: Any, tensors: Iterator[torch.Tensor]) -> Any:
    kind, payload = skeleton
    if kind == "tensor":
        return next(tensors)
    if kind in ("tuple", "list"):
        items = [_unflatten(s, tensors) for s in payload]
        return tuple(items) if kind == "tuple" else items
    return payload


class _BlockLoop(engine._EvaLoop):
    """The whole-model loop restricted to one block's groups: it runs every calibration batch (the
    next block needs their outputs), never ends a pass before the block's end, and probes on a whole
    batch (a probe slice would not line up with the replayed hidden states)."""

    probe_on_slice = False

    def _exit_enabled(self) -> bool:
        return False

    def _set_feeding(self) -> None:
        for record in self.groups:
            record.layer.active = engine.FEED_CONVERGED or record.stop_batch is None

    def _check(self) -> bool:
        if self.groups and all(r.stop_batch is not None for r in self.groups):
            return False  # this block has converged: no more solves, the batches still run
        super()._check()
        return False


class _Replay:
    """Blocks before the current one return the cached output of the block just before it."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.blocks = blocks
        self.cache: BlockOutputs | None = None
        self.index = 0
        self.device = torch.device("cpu")

    @contextlib.contextmanager
    def before(self, upto: int) -> Iterator[None]:
        def replay(*args: Any, **kwargs: Any) -> Any:
            return self.cache.get(self.index, self.device)

        for block in list(self.blocks)[:upto]:
            block.forward = replay
        try:
            yield
        finally:
            for block in list(self.blocks)[:upto]:
                del block.forward


def sequential_eva_state(
    model: nn.Module,
    batches: Iterable[Any],
    config: EvaConfig,
    options: SequentialOptions,
    *,
    progress: bool = True,
    strict: bool = False,
    layers: Mapping[str, nn.Module] | None = None,
) -> EvaState:
    """EVA computed block by block (see the module docstring); ``compute_eva_state`` calls it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError(
            "sequential EVA runs in one process; under torch.distributed, shard the model with "
            "FSDP2 and use the whole-model loop instead"
        )
    with eager(model) as runnable, engine._no_kv_cache(runnable):
        blocks_name, blocks = find_blocks(runnable, options.blocks)
        targets = dict(layers) if layers is not None else find_target_layers(runnable, config)
        calibration = _calibration_set(batches, config, options)
        device = _compute_device(runnable, options)
        offload_root = None if str(options.offload) == "cpu" else Path(options.offload)
        if offload_root is not None:
            offload_root.mkdir(parents=True, exist_ok=True)
            _check_room(runnable, calibration, offload_root, 3 if options.weights else 2)
        checkpoint = None
        if options.checkpoint_dir is not None:
            checkpoint = BlockCheckpoint(options.checkpoint_dir, options.resume)
            checkpoint.start(
                {
                    "calibration_sha256": calibration_digest(calibration),
                    "blocks": blocks_name,
                    "n_blocks": len(blocks),
                    "targets": sorted(targets),
                    "settings": config.statistics_dict(),
                }
            )
        elif options.resume:
            raise ValueError("resume needs the checkpoint_dir the interrupted run wrote")
        scratch = (
            None
            if offload_root is None
            else Path(tempfile.mkdtemp(prefix="eva-offload-", dir=offload_root))
        )
        try:
            with (
                eval_mode(runnable),
                _OnDevice(runnable, blocks, device, options.weights) as placement,
            ):
                loops = _run_blocks(
                    runnable,
                    blocks_name,
                    blocks,
                    targets,
                    calibration,
                    config,
                    placement,
                    scratch,
                    progress,
                    checkpoint,
                )
            final = engine._EvaLoop(
                runnable, ActivationCapture(targets), config, None, progress=False, strict=strict
            )
            final.adopt(loops)
            return final.build_state(layer_shapes(targets))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)


def _run_blocks(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    targets: dict[str, nn.Module],
    calibration: list[dict[str, Any]],
    config: EvaConfig,
    placement: _OnDevice,
    scratch: Path | None,
    progress: bool,
    checkpoint: BlockCheckpoint | None = None,
) -> list[Any]:
    replay = _Replay(blocks)
    replay.device = placement.device
    loops: list[Any] = []
    inside = [f"{blocks_name}.{i}." for i in range(len(blocks))]
    bar = _block_bar(progress, len(blocks))
    done = checkpoint.committed() if checkpoint is not None else {}
    last = max(done, default=-1)
    previous: BlockOutputs | None = None
    if last >= 0:  # resume: the committed blocks as they are, from the last one's outputs
        previous = BlockOutputs.load(checkpoint.folder / f"outputs-{last}")
    embeddings = _ReplayedEmbeddings.for_model(model, placement, replay)
    if embeddings is not None:
        embeddings.keep_outputs(model, calibration, scratch)
    for i, block in enumerate(blocks):
        if i <= last:
            if done.get(i) is not None:
                loops.append(done[i])
            if bar is not None:
                bar.update(1)
            continue
        mine = {n: m for n, m in targets.items() if n.startswith(inside[i])}
        if checkpoint is not None:
            folder = checkpoint.outputs_folder(i)
        else:
            folder = None if scratch is None else scratch / f"block{i}"
            if folder is not None:
                folder.mkdir()
        outputs = BlockOutputs(folder, len(calibration))
        replay.cache = previous
        with (
            placement.onloaded(block, f"{blocks_name}.{i}"),
            replay.before(i),
            embeddings.replayed() if embeddings is not None else contextlib.nullcontext(),
        ):
            loop = _run_one(model, block, mine, calibration, config, replay, outputs)
        if loop is not None:
            loops.append(loop)
        if checkpoint is not None:
            outputs.save_index()
            checkpoint.commit(i, loop, folder)
        elif previous is not None and previous.folder is not None:
            shutil.rmtree(previous.folder, ignore_errors=True)
        previous = outputs
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    outer = {n: m for n, m in targets.items() if not any(n.startswith(p) for p in inside)}
    if outer:  # e.g. an LM head: every block replayed, the model runs to its end
        replay.cache = previous
        with (
            replay.before(len(blocks)),
            embeddings.replayed() if embeddings is not None else contextlib.nullcontext(),
        ):
            loops.append(_run_one(model, None, outer, calibration, config, replay, None))
    if not loops:
        raise ValueError("no target layer was found in the model")
    return loops


def _run_one(
    model: nn.Module,
    block: nn.Module | None,
    layers: dict[str, nn.Module],
    calibration: list[dict[str, Any]],
    config: EvaConfig,
    replay: _Replay,
    outputs: BlockOutputs | None,
) -> engine._EvaLoop | None:
    """One block's loop over the calibration set (``block=None``: the targets outside blocks)."""

    def forward(runnable: nn.Module, batch: Any) -> None:
        _call(runnable, batch, replay)

    handle = None
    if block is not None:

        def keep_output(module: nn.Module, args: Any, output: Any) -> None:
            outputs.put(replay.index, output)
            raise StopForward

        handle = block.register_forward_hook(keep_output)
    try:
        if not layers:  # a block without targets still has to produce the next block's inputs
            for batch in calibration:
                with contextlib.suppress(StopForward), torch.no_grad():
                    forward(model, to_device(batch, replay.device))
            return None
        capture = ActivationCapture(layers, config.use_label_mask, config.label_mask_value)
        loop_class = _BlockLoop if block is not None else engine._EvaLoop
        with torch.no_grad(), capture:
            loop = loop_class(model, capture, config, forward, progress=False)
            loop.run(iter(calibration))
        loop.release_statistics()  # a finished block's statistics leave the device
        return loop
    finally:
        if handle is not None:
            handle.remove()


def _call(model: nn.Module, batch: dict[str, Any], replay: _Replay) -> None:
    """One calibration batch through the model (no labels: no logits or loss are wanted)."""
    replay.index = batch[INDEX_KEY]
    model(**{k: v for k, v in batch.items() if k not in (INDEX_KEY, "labels")})


class _ReplayedEmbeddings:
    """The input embeddings of a model read from disk, in memory for one pass only.

    :meth:`keep_outputs` runs every calibration batch as far as the embeddings, keeps what they
    return (CPU memory or the offload folder) and drops their weights; afterwards their ``forward``
    returns the kept output for the batch."""

    def __init__(self, module: nn.Module, placement: _OnDevice, replay: _Replay) -> None:
        self.module, self.placement, self.replay = module, placement, replay
        self.outputs: BlockOutputs | None = None

    @classmethod
    def for_model(
        cls, model: nn.Module, placement: _OnDevice, replay: _Replay
    ) -> _ReplayedEmbeddings | None:
        """None unless the embeddings are read from disk (a model in memory keeps them) and the
        model says which module they are (``get_input_embeddings``)."""
        if not placement.reads_any_lazily:
            return None
        try:
            module = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if not isinstance(module, nn.Module) or not placement.reads_lazily(module):
            return None
        return cls(module, placement, replay)

    def keep_outputs(
        self, model: nn.Module, calibration: list[dict[str, Any]], scratch: Path | None
    ) -> None:
        folder = None if scratch is None else scratch / "embeddings"
        if folder is not None:
            folder.mkdir(exist_ok=True)
        self.outputs = BlockOutputs(folder, len(calibration))
        kept: set[int] = set()

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs.put(self.replay.index, output)
            kept.add(self.replay.index)
            raise StopForward

        handle = self.module.register_forward_hook(keep)
        try:
            for batch in calibration:
                with contextlib.suppress(StopForward), torch.no_grad():
                    _call(model, to_device(batch, self.replay.device), self.replay)
        finally:
            handle.remove()
            self.placement.drop(self.module)
        if len(kept) != len(calibration):
            raise ValueError(
                "the model's forward did not call its input embeddings "
                f"({type(self.module).__name__}, from get_input_embeddings()) for "
                f"{len(calibration) - len(kept)} of {len(calibration)} calibration batches: "
                "sequential EVA from disk needs them; load the model whole and pass it instead"
            )

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.outputs.get(self.replay.index, self.replay.device)

        self.module.forward = forward
        try:
            yield
        finally:
            del self.module.forward


def _calibration_set(
    batches: Iterable[Any], config: EvaConfig, options: SequentialOptions
) -> list[dict[str, Any]]:
    """The first ``calibration_batches`` batches (at most ``max_batches``), tagged with indices."""
    count = options.calibration_batches or DEFAULT_CALIBRATION_BATCHES
    if count < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {count}")
    count = min(count, config.max_batches)
    stream = bounded_stream(batches, count)
    out = []
    while (item := next_batch(stream, len(out))) is not None and item[0] == 0:
        batch = item[1]
        if not isinstance(batch, Mapping):
            raise TypeError(
                "sequential EVA takes token batches (dicts such as {'input_ids': ..., "
                f"'attention_mask': ...}}), not {type(batch).__name__}"
            )
        out.append({**batch, INDEX_KEY: len(out)})
    return out


def _check_room(
    model: nn.Module, calibration: list[dict[str, Any]], folder: Path, caches: int = 2
) -> None:
    """Before any work: two blocks' hidden states (tokens x hidden width) must fit in ``folder``,
    three when the embeddings' output waits there too (weights read from disk)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    width = getattr(embeddings, "embedding_dim", None)
    if width is None:
        return  # checked again before the first file is written
    itemsize = torch.finfo(embeddings.weight.dtype).bits // 8
    tokens = sum(
        b["input_ids"].numel() for b in calibration if isinstance(b.get("input_ids"), torch.Tensor)
    )
    require_free_space(
        folder,
        int(caches * tokens * width * itemsize * SPACE_MARGIN),
        f"the hidden states of {len(calibration)} calibration batches (point the offload at "
        "another folder, or use fewer calibration batches)",
    )


def _compute_device(model: nn.Module, options: SequentialOptions) -> torch.device:
    if options.device is not None:
        return torch.device(options.device)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _OnDevice:
    """Puts the non-block modules on the compute device for the run, and one block at a time.

    A block whose weights are in memory (CPU, or already on the device) is moved to the device and
    back; one on the meta device is read from ``weights`` and dropped again afterwards."""

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, device: torch.device, weights: Any
    ) -> None:
        self.model, self.blocks, self.device, self.weights = model, blocks, device, weights
        self._moved: list[tuple[nn.Module, torch.device]] = []
        # modules outside the blocks read from disk when first called: module id -> (name, hook)
        self._lazy: dict[int, tuple[str, nn.Module, Any]] = {}

    def __enter__(self) -> _OnDevice:
        inside = {id(m) for m in self.blocks.modules()}
        for name, module in self.model.named_modules():
            if id(module) in inside:
                continue
            own = [
                t
                for t in list(module._parameters.values()) + list(module._buffers.values())
                if t is not None
            ]
            if any(t.device.type == "meta" for t in own):
                self._need_weights(name)
                hook = module.register_forward_pre_hook(self._read_when_called(name))
                self._lazy[id(module)] = (name, module, hook)
            elif any(t.device != self.device for t in own):
                self._moved.append((module, own[0].device))
                _move_own(module, self.device)
        return self

    def _read_when_called(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if "forward" in module.__dict__:  # replayed (embeddings, blocks): no weights needed
                return
            if any(p.is_meta for p in module.parameters(recurse=False)):
                self.weights.load(self.model, module, name, self.device, recurse=False)

        return hook

    def reads_lazily(self, module: nn.Module) -> bool:
        """``module`` is outside the blocks and read from disk when it is called."""
        return id(module) in self._lazy

    @property
    def reads_any_lazily(self) -> bool:
        return bool(self._lazy)

    def drop(self, module: nn.Module) -> None:
        """A module read from disk goes back to the meta device (read again if called again)."""
        if any(not p.is_meta for p in module.parameters(recurse=False)):
            self.weights.release(module, recurse=False)

    def __exit__(self, *exc: object) -> None:
        for _, module, hook in self._lazy.values():
            hook.remove()
            self.drop(module)
        self._lazy.clear()
        for module, home in self._moved:
            _move_own(module, home)

    @contextlib.contextmanager
    def onloaded(self, block: nn.Module, name: str) -> Iterator[None]:
        params = list(block.parameters())
        if any(p.device.type == "meta" for p in params):
            self._need_weights(name)
            try:  # a block that fails half-read is dropped again too
                self.weights.load(self.model, block, name, self.device)
                yield
            finally:
                self.weights.release(block)
            return
        home = params[0].device if params else self.device
        if home != self.device:
            block.to(self.device)
        try:
            yield
        finally:
            if home != self.device:
                block.to(home)

    def _need_weights(self, name: str) -> None:
        if self.weights is None:
            raise ValueError(
                f"{name or 'the model'} has weights on the meta device and no weights= source to "
                "read them from (load the model with eva_lora.disk_weights.empty_model_from_folder)"
            )


def _move_own(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers (not its children's), in place: a parameter shared
    with another module (tied embeddings) stays one object."""
    for param in module._parameters.values():
        if param is not None:
            param.data = param.data.to(device)
    for key, buf in list(module._buffers.items()):
        if buf is not None:
            module._buffers[key] = buf.to(device)


def _block_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="EVA (sequential): blocks done", leave=False, dynamic_ncols=True)

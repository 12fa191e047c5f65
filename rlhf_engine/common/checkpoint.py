"""The pieces of a checkpoint that do not depend on how models are stored: atomic directories, the
pickle-free training-state files, the run's checkpoint folders, RNG states.

A PPO checkpoint is a directory `run_dir/checkpoints/step-{k:08d}/` holding (see `distributed.dcp`)
  dcp/               model and optimizer state (torch.distributed.checkpoint, reshardable across world sizes)
  policy/            the policy as an HF safetensors folder (loads in transformers and vLLM as is); with
                     LoRA a PEFT adapter folder (`PeftModel.from_pretrained(base, policy/)`; `rlhf-engine
                     export --merge` writes the merged HF folder); the causal LM alone, nothing else
  value_head.safetensors  the policy's value head (when it has one): beside policy/, so that policy/ serves
  critic/            a separate critic (`model.value_model`): its HF folder and its value head
  state.safetensors  every tensor of the rest of the training state (RNG states, ...)
  state.json         the rest of the training state, with {"__tensor__": key} where a tensor was
It is written to a temporary sibling directory, fsynced, then renamed into place, so a crash
leaves either the previous checkpoint or the new one, never half of one. The state files never
unpickle anything (tensors come from safetensors, the rest from JSON); `dcp/` is torch's format,
whose `.metadata` is a pickle: resume only checkpoints you trust.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
_STEP_RE = re.compile(r"^step-(\d{8})$")
_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"


def flatten_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested dict/list/tuple tree into a JSON-able tree and a flat {key: tensor} map."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = path or "root"
            tensors[key] = node.detach().cpu().contiguous()
            return {_TENSOR_TAG: key}
        if isinstance(node, dict):
            for k in node:
                if not isinstance(k, (str, int)):
                    raise TypeError(f"state key {k!r} at {path or '<root>'} must be str or int")
            # int keys (optimizer state) are kept as typed pairs so they come back as ints
            return {"__items__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {_TUPLE_TAG: [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at {path or '<root>'}")

    return walk(tree, ""), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(tree, dict):
        if _TENSOR_TAG in tree:
            return tensors[tree[_TENSOR_TAG]]
        if _TUPLE_TAG in tree:
            return tuple(unflatten_state(v, tensors) for v in tree[_TUPLE_TAG])
        return {k: unflatten_state(v, tensors) for k, v in tree["__items__"]}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` (atomically, after fsync) on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM while a checkpoint is written, and deliver them to the handlers in
    place before once it is: an interrupt in the middle of a write does not come out as an interrupt (torch's
    zip writer, under DCP, turns it into `RuntimeError: unexpected pos`), and the checkpoint in progress is
    the one a user who stops a run wants kept. A second signal is delivered at once, so a save stuck on a
    dead peer stays interruptible. Signal handlers belong to the main thread: in another thread this holds
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in _HELD_SIGNALS}
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held:  # the second: now
            held.clear()
            _restore(previous)
            _deliver(signum, previous[signum], frame)
        else:
            held.append(signum)

    for signum in _HELD_SIGNALS:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        _restore(previous)
        if held:
            _deliver(held[0], previous[held[0]], None)


def _restore(handlers: dict[int, Callable | int | None]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _deliver(signum: int, handler: Callable | int | None, frame: FrameType | None) -> None:
    """What `signum` would have done under `handler` (installed again by the caller)."""
    if callable(handler):
        handler(signum, frame)
    elif handler in (signal.SIG_DFL, None):
        os.kill(os.getpid(), signum)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here (damaged, written for other models, or in a layout this run
    cannot take); the message names its path and what to do."""


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write the training-state tree `state` (tensors and JSON-able values) as `directory`'s state files."""
    tree, tensors = flatten_state(state)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(tree))


def load_state(ckpt: str | Path) -> dict[str, Any]:
    """The training state tree saved in checkpoint directory `ckpt`."""
    ckpt = Path(ckpt)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{ckpt} is not a complete checkpoint: {name} is missing")
    try:
        tensors = load_file(str(ckpt / STATE_TENSORS))
        return unflatten_state(json.loads((ckpt / STATE_JSON).read_text()), tensors)
    except Exception as e:  # a truncated or foreign file: say which checkpoint
        raise CheckpointError(f"{ckpt}: its {STATE_JSON} / {STATE_TENSORS} cannot be read ({type(e).__name__}: "
                              f"{e}); the checkpoint is damaged: resume from an earlier one") from e


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete the run's checkpoints but the newest `keep_last` (>= 1)."""
    if keep_last < 1:
        raise ValueError(f"keep_last ({keep_last}) must be >= 1")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """The RNG states this process uses (torch CPU, Python `random`, NumPy)."""
    import random

    import numpy as np

    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))

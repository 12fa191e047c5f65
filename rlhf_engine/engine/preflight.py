"""What a PPO run can check from its config and the files it names, before it plans cores, loads a model or
starts a process: model folders, data files, the reward and gold functions, the environment, the transport's
keys, the checkpoint to resume from. (Types, ranges and lengths against the policy's positions are checked when the
config is loaded: `RunConfig.__post_init__`.) Every failure is a `ConfigError` or `TransportError` naming
the setting to change."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_engine.common.checkpoint import CHECKPOINT_DIR, STATE_JSON, latest_checkpoint
from rlhf_engine.common.config_io import ConfigError
from rlhf_engine.engine.config import RunConfig, import_function
from rlhf_engine.transport.endpoints import check_security


def check_run(config: RunConfig, resume: str | Path | None = None) -> Path | None:
    """Check `config` (and `--resume`) without loading a model; returns the checkpoint to resume from (None:
    a fresh run). Raises `ConfigError`, `TransportError` or `FileNotFoundError` (no checkpoint)."""
    m = config.model
    m.check_folders()
    for field in ("reward_fn", "gold_fn"):
        spec = getattr(m, field)
        if spec is not None:
            try:
                import_function(spec)
            except ConfigError as e:
                raise ConfigError(f"model.{field}: {e}") from e
    try:
        config.generator.environment.resolve()
    except ValueError as e:
        raise ConfigError(f"generator.{e}") from e
    for field in ("prompts", "eval_prompts"):
        path = getattr(config.data, field)
        if path is not None and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"data.{field}: no such file or folder: {path}")
    try:
        check_security(config.transport, server=True)
    except (OSError, ValueError) as e:  # keys that do not load
        raise ConfigError(f"transport.curve_keys_dir: {' '.join(str(e).split())}") from e
    return resume_checkpoint(resume)


def resume_checkpoint(resume: str | Path | None) -> Path | None:
    """The checkpoint `--resume` names: a checkpoint folder, or a run folder's newest complete checkpoint."""
    if resume is None:
        return None
    from rlhf_engine.distributed.dcp import DCP_DIR

    ckpt = Path(resume)
    if (ckpt / STATE_JSON).is_file() or (ckpt / DCP_DIR).is_dir():
        return ckpt
    newest = latest_checkpoint(ckpt)
    if newest is None:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint in {resume}/checkpoints")
    return newest


def resumed_run_folder(resume: str | Path) -> Path | None:
    """The run folder `--resume` continues in when it names one; None for a checkpoint folder
    (`RUN_DIR/checkpoints/step-N`, or any folder holding a checkpoint's state.json): a run started from a chosen checkpoint writes into its config's
    `engine.run_dir` (a branch of the run, e.g. onto another world size, beside the original)."""
    path = Path(resume)
    return None if path.parent.name == CHECKPOINT_DIR or (path / STATE_JSON).is_file() else path

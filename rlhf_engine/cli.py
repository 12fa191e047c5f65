"""`rlhf-engine`: the command line.

  rlhf-engine sft     --config sft.yaml      supervised fine-tuning
  rlhf-engine reward  --config rm.yaml       reward model on preference pairs
  rlhf-engine dpo     --config dpo.yaml      direct preference optimisation
  rlhf-engine ppo     --config run.yaml      async PPO (trainer here, generators as child processes)
  rlhf-engine generator --config run.yaml    a generator process that connects to a trainer
  rlhf-engine plot    RUN_DIR                PNG plots of a run
  rlhf-engine export  --merge CKPT OUT       the policy of a checkpoint as a plain HF folder (LoRA merged)
  rlhf-engine demo                           the whole pipeline on a tiny built-in task
  rlhf-engine keys    DIR                    a CURVE keypair for non-loopback endpoints

Every `--config` command takes `--set section.key=value` overrides (repeatable). Config, data,
checkpoint, transport, rendezvous, generator and missing-file errors print one line (file:line: field
..., or the setting to change) and exit with status 2; `--debug` shows the traceback instead.
transformers' progress bars and logs are hidden unless `-v`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

EXAMPLES = """examples:
  rlhf-engine ppo --config run.yaml --set ppo.init_kl_coef=0.1 --set engine.total_steps=50
  rlhf-engine ppo --config run.yaml --resume runs/ppo
  rlhf-engine generator --config run.yaml --connect tcp://10.0.0.5:5555
  rlhf-engine plot runs/ppo
  rlhf-engine convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ppo.init_kl_coef=0.1 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-engine", description="Asynchronous RLHF: SFT, reward model, PPO and DPO.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, text in (("sft", "supervised fine-tuning on prompt/completion, chat or text data"),
                       ("reward", "train a reward model on prompt/chosen/rejected pairs"),
                       ("dpo", "direct preference optimisation on prompt/chosen/rejected pairs")):
        p = sub.add_parser(name, help=text, description=f"{text.capitalize()}. The YAML holds the fields of "
                           f"{_STAGE_CONFIGS[name][1]} (see its docstrings).")
        _add_config_args(p)

    p = sub.add_parser("ppo", help="async PPO run (trainer here, generators as child processes)",
                       description="Run PPO with the async engine. The YAML has sections model, data, ppo, "
                                   "generator, transport, engine (see rlhf_engine/engine/config.py).")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue from the newest checkpoint of RUN_DIR (or a "
                   "checkpoint folder of it), in RUN_DIR whatever engine.run_dir says")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run the trainer as N ranks on this host (torchrun; settings in the trainer: section)")

    p = sub.add_parser("generator", help="a generator process that connects to a trainer",
                       description="Start a generator: loads generator and transport settings from the run's "
                                   "YAML, connects to the trainer and samples until it is told to stop.")
    _add_config_args(p)
    p.add_argument("--connect", metavar="ENDPOINT", help="trainer endpoint (default: transport.endpoint)")
    p.add_argument("--name", default="generator", help="name shown in the trainer's logs")
    p.add_argument("--weights", metavar="FILE", help="safetensors file of newer policy weights to start from "
                   "(the engine passes it to a replacement generator)")
    p.add_argument("--weights-version", type=int, default=0, metavar="V", help="the policy version of --weights")

    p = sub.add_parser("plot", help="write PNG plots of a run", description="Write PNGs of reward, KL, KL "
                       "coefficient, entropy, losses, throughput and the process timeline into RUN_DIR/plots.")
    p.add_argument("run_dir", metavar="RUN_DIR")

    p = sub.add_parser("export", help="write a checkpoint's policy as a plain HF folder (LoRA merged)",
                       description="Write the policy of a PPO checkpoint as an HF folder that AutoModelForCausalLM "
                                   "and vLLM load as is: LoRA adapters are merged into their base (W + scale * B @ A), "
                                   "full weights are copied; no value head.")
    p.add_argument("--merge", action="store_true", required=True, help="merge LoRA adapters into the base")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint folder (runs/x/checkpoints/step-N), a run folder (its newest checkpoint) or a "
                        "policy folder")
    p.add_argument("out", metavar="OUT", help="the HF folder to write")
    p.add_argument("--base", metavar="DIR", help="the base model folder (default: the one the adapters name)")

    p = sub.add_parser("convert-gguf", help="write a GGUF model file as an HF folder",
                       description="Dequantize a GGUF model file (pip install gguf) into an HF folder that "
                                   "transformers, vLLM and every stage load: safetensors weights (fp32), tokenizer "
                                   "with its chat template, generation config with the end-of-turn ids.")
    p.add_argument("gguf_file", metavar="FILE", help="the .gguf file")
    p.add_argument("out", metavar="OUT", help="the HF folder to write (must not exist)")

    p = sub.add_parser("demo", help="SFT -> reward model -> async PPO on a tiny built-in task",
                       description="Build a tiny tokenizer and Llama, run SFT, train a reward model on "
                                   "synthetic preferences, run async PPO with the vLLM generator, print a summary.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--ppo-steps", type=int, default=None, help="PPO steps (default: the demo's budget)")
    p.add_argument("--small", action="store_true", help="a very small budget (for tests)")
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "transformers"), help="generator backend")

    p = sub.add_parser("keys", help="write CURVE keypairs", description="Write CURVE keypairs into DIR "
                       "(point transport.curve_keys_dir at it on both ends; every tcp endpoint needs them).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--client", metavar="NAME", help="add a keypair for one generator: DIR/clients/NAME.key(_secret)")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")

    return parser


_STAGE_CONFIGS = {
    "sft": ("rlhf_engine.trainer.stages.sft_config", "SFTConfig", "rlhf_engine.trainer.stages.sft", "SFTTrainer"),
    "reward": ("rlhf_engine.trainer.stages.reward_config", "RewardConfig", "rlhf_engine.trainer.stages.reward", "RewardTrainer"),
    "dpo": ("rlhf_engine.trainer.stages.dpo_config", "DPOConfig", "rlhf_engine.trainer.stages.dpo", "DPOTrainer"),
}


def _run_stage(name: str, args: argparse.Namespace) -> int:
    import importlib

    from rlhf_engine.common.config_io import apply_overrides, from_dict, load_yaml, yaml_lines

    cfg_module, cfg_name, trainer_module, trainer_name = _STAGE_CONFIGS[name]
    config_cls = getattr(importlib.import_module(cfg_module), cfg_name)
    trainer_cls = getattr(importlib.import_module(trainer_module), trainer_name)
    data = apply_overrides(load_yaml(args.config), args.overrides)
    config = from_dict(config_cls, data, source=args.config, lines=yaml_lines(args.config))
    trainer = trainer_cls(config)
    metrics = trainer.train()  # saves the final model to output_dir
    print(f"{name}: saved to {config.output_dir}")
    for k, v in sorted(metrics.items()):
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _run_ppo(args: argparse.Namespace, argv: list[str]) -> int:
    config = _ppo_config(args)  # before the engine's imports: a config error is reported at once
    from rlhf_engine.common.heap import settle
    from rlhf_engine.distributed import launched_by_torchrun

    if not launched_by_torchrun():  # the launching command checked it (the ranks start from the same files)
        from rlhf_engine.engine.preflight import check_run

        check_run(config, args.resume)  # model folders, data, functions, keys, checkpoint: before any work
    if args.nproc is not None and not launched_by_torchrun():
        return _launch_ranks(config, args.nproc, argv)
    if launched_by_torchrun():
        from rlhf_engine.engine.ranks.run import preflight, run_ppo_ranks

        try:
            preflight(config)
        except (ValueError, RuntimeError) as e:  # RendezvousError is a RuntimeError
            print(f"rlhf-engine ppo: trainer ranks: {e}", file=sys.stderr)
            return 2
        from rlhf_engine.engine.ranks.failure import RankFailed

        settle()
        try:
            summary = run_ppo_ranks(config, args.resume)
        except RankFailed as e:
            print(f"rlhf-engine ppo: {_one_line(e)}; {_resume_hint(config.engine.run_dir)}", file=sys.stderr)
            return 1
        if summary is None:  # not rank 0
            return 0
    else:
        from rlhf_engine.distributed.group import resolve_device
        from rlhf_engine.engine.core import RLHFEngine

        try:
            resolve_device(config.trainer)
        except RuntimeError as e:
            print(f"rlhf-engine ppo: {e}", file=sys.stderr)
            return 2
        with RLHFEngine(config, resume=args.resume) as engine:
            settle()
            for _ in engine.steps():
                pass
            summary = engine.summary()
    print(f"ppo: {summary['steps']} steps in {summary['wall_s']:.1f} s, "
          f"{summary['generated_tokens_per_s']:.0f} generated tokens/s; run dir {config.engine.run_dir}")
    return 0


def _ppo_config(args: argparse.Namespace):
    """The run's config; with `--resume RUN_DIR` the run continues in RUN_DIR (its metrics, checkpoints and
    W&B id are there) whatever the config's `engine.run_dir` says. `--resume RUN_DIR/checkpoints/step-N` starts
    from that checkpoint into the config's `engine.run_dir` (a branch beside the original run)."""
    from rlhf_engine.engine.config import load_run_config
    from rlhf_engine.engine.preflight import resumed_run_folder

    config = load_run_config(args.config, args.overrides)
    run_dir = resumed_run_folder(args.resume) if args.resume is not None else None
    if run_dir is None:
        return config
    if Path(config.engine.run_dir).resolve() != run_dir.resolve():
        logging.getLogger("rlhf_engine.cli").info("--resume %s: the run continues in %s (the config's "
                                                  "engine.run_dir is %s)", args.resume, run_dir, config.engine.run_dir)
        config = load_run_config(args.config, [*args.overrides, f"engine.run_dir={run_dir}"])
    return config


def _resume_hint(run_dir: str) -> str:
    """Where a stopped run continues from: `--resume RUN_DIR` and its newest checkpoint's step."""
    from rlhf_engine.common.checkpoint import latest_checkpoint, load_state

    newest = latest_checkpoint(Path(run_dir))
    if newest is None:
        return f"no checkpoint was written yet (engine.save_steps) in {run_dir}"
    return f"continue with --resume {run_dir} (newest checkpoint: step {load_state(newest)['step']})"


def _launch_ranks(config, nproc: int, argv: list[str]) -> int:
    """`--nproc N`: check that the batch splits over N ranks, then re-run this command under torchrun."""
    from rlhf_engine.common.heap import settle
    from rlhf_engine.engine.ranks.launch import relaunch
    from rlhf_engine.engine.ranks.run import preflight

    try:
        preflight(config, nproc)
    except (ValueError, RuntimeError) as e:
        print(f"rlhf-engine ppo: --nproc {nproc}: {e}", file=sys.stderr)
        return 2
    settle()
    return relaunch(nproc, argv, restarts=config.engine.trainer_restarts, run_dir=config.engine.run_dir)


def _run_generator(args: argparse.Namespace) -> int:
    import dataclasses

    from rlhf_engine.engine.config import load_run_config
    from rlhf_engine.rollout.config import run_generator_config
    from rlhf_engine.rollout.process import run_generator
    from rlhf_engine.transport.endpoints import check_security

    config = load_run_config(args.config, args.overrides)
    transport = config.transport
    if args.connect:
        transport = dataclasses.replace(transport, endpoint=args.connect)
    check_security(transport, server=False)  # before the model loads
    # with model.lora.sync: adapters the generator takes the adapters on the base in model.policy
    generator = run_generator_config(config.generator, config.model.lora)
    run_generator(generator, transport, name=args.name, max_staleness=config.engine.max_staleness,
                  weights=args.weights, weights_version=args.weights_version)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from rlhf_engine.common.checkpoint import latest_checkpoint
    from rlhf_engine.models.loading import export_merged

    src = Path(args.checkpoint)
    if not src.is_dir():
        raise FileNotFoundError(2, "no such folder", str(src))
    newest = latest_checkpoint(src)
    ckpt = newest if newest is not None else src
    policy = ckpt / "policy" if (ckpt / "policy").is_dir() else ckpt
    out = export_merged(policy, args.out, base=args.base)
    print(f"export: {policy} -> {out}")
    return 0


def _one_line(error: BaseException) -> str:
    text = str(error) if not isinstance(error, FileNotFoundError) or not error.filename else \
        f"{error.filename}: {error.strerror or 'no such file or directory'}"
    return " ".join(text.split())


_MODEL_COMMANDS = ("sft", "reward", "dpo", "ppo", "generator", "export", "convert-gguf", "demo")
"""Commands that load models with transformers."""


def _quiet_third_party() -> None:
    """Our progress and metrics only on the terminal: transformers' progress bars ("Loading weights", "Writing
    model shards") and its INFO/WARNING logs (a load report) are hidden; `-v` leaves them on. Set here, in the
    command line, never at import of the library (no global state changes for its users). Before transformers
    is imported, as the environment it reads at import (importing it here would cost a command that stops at a
    config error a second); the processes the command starts inherit it and are as quiet."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_RUN_COMMANDS = ("ppo", "generator")
"""Commands that load torch and transformers: as the process's program they end without the interpreter's
teardown (``_exit_now``)."""


def _exit_now(code: int) -> None:
    """End this process with ``code`` now, without the interpreter's teardown: for a run (ppo, generator)
    that teardown (module and object cleanup of torch and transformers) takes 1-4 s of a quiet 2-core machine
    and 15-30 s of a loaded one, after everything was already stopped, written and closed (so Ctrl-C took
    that long to return)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """The command line; ``argv`` None: this is the process's program (``rlhf-engine``, ``python -m
    rlhf_engine.cli``), and a run command ends the process itself (``_exit_now``) once it finished."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if program and args.command in _RUN_COMMANDS:
        from rlhf_engine.common.heap import pause_collection

        pause_collection()  # until the run has started (`settle`)
    code = _run(parser, args, argv)
    if program and args.command in _RUN_COMMANDS:
        _exit_now(code)
    return code


_ERROR_KINDS = (
    ("rlhf_engine.common.config_io", ("ConfigError",), "config error"),
    ("rlhf_engine.data.records", ("DataError",), "data error"),
    ("rlhf_engine.common.checkpoint", ("CheckpointError",), "checkpoint error"),
    ("rlhf_engine.models.gguf", ("ConversionError",), "conversion error"),
    ("rlhf_engine.transport.errors", ("TransportError",), "transport error"),
    ("rlhf_engine.distributed.group", ("RendezvousError",), "trainer ranks"),
    ("builtins", ("FileNotFoundError",), "missing file"),
    ("rlhf_engine.engine.generators", ("GeneratorExited", "RestartBudgetExceeded"), "generator error"),
    ("rlhf_engine.engine.supervisor", ("NoGeneratorLeft",), "generator error"),
)
"""The errors a command meets, each printed as one line (`--debug`: the traceback) with status 2: (module, classes,
kind). Named, not imported: an error of a class exists only once its module is loaded, so a command that fails
early (a config error) does not pay for importing the engine to report it."""


def _error_kind(error: BaseException) -> str | None:
    """The kind of `error` among _ERROR_KINDS (None: not one of them, a bug to show with its traceback)."""
    for module_name, names, kind in _ERROR_KINDS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, name) for name in names)):
            return kind
    return None


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose and args.command in _MODEL_COMMANDS:
        _quiet_third_party()
    # SIGTERM stops a run the way Ctrl-C does: generators shut down, the last checkpoint stays intact
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.command in _STAGE_CONFIGS:
            return _run_stage(args.command, args)
        if args.command == "ppo":
            return _run_ppo(args, argv)
        if args.command == "generator":
            return _run_generator(args)
        if args.command == "plot":
            from rlhf_engine.telemetry.plots import plot_run

            for path in plot_run(args.run_dir):
                print(path)
            return 0
        if args.command == "export":
            return _run_export(args)
        if args.command == "convert-gguf":
            from rlhf_engine.models.gguf import convert_gguf

            print(f"convert-gguf: {args.gguf_file} -> {convert_gguf(args.gguf_file, args.out)}")
            return 0
        if args.command == "demo":
            from rlhf_engine.demo import run_demo

            run_demo(Path(args.out), ppo_steps=args.ppo_steps, small=args.small, backend=args.backend)
            return 0
        if args.command == "keys":
            from rlhf_engine.transport import keys_main

            return keys_main([args.dir, *(["--client", args.client] if args.client else []),
                              *(["--force"] if args.force else [])])
    except Exception as e:
        kind = _error_kind(e)
        if kind is None or args.debug:
            raise
        generators = sys.modules.get("rlhf_engine.engine.generators")
        exited = generators is not None and isinstance(e, generators.GeneratorExited)
        text = str(e).split("\n")[0] if exited else _one_line(e)  # a generator's log tail stays in the log
        print(f"rlhf-engine {args.command}: {kind}: {' '.join(text.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf-engine {args.command}: interrupted; everything was stopped", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

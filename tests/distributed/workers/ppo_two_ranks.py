"""2-rank worker of the equivalence tests: argv = out_dir, checkpoint saved by the 1-rank run after step 1.

Writes <out>/<run>.safetensors and <out>/<run>.json for every scenario, ddp (gae replicated),
resumed_from_1 (the 1-rank checkpoint continued at 2 ranks), and the checkpoint <out>/ckpt_2ranks after
step 1 of gae.
"""

import os
import sys
from pathlib import Path

from ppo_scenarios import SCENARIOS, STEPS, load_trainer, make_trainer, run_steps, write_result

from rlhf_engine.distributed import Comm, DistributedConfig, destroy_process_group, init_process_group


def main(out: Path, ckpt_1rank: Path) -> None:
    _, device = init_process_group(DistributedConfig(backend="gloo", timeout_s=60))
    comm = Comm.from_process_group(device)
    for scenario in SCENARIOS:
        trainer = make_trainer(comm, scenario)
        save_after = 1 if scenario == "gae" else None
        history = run_steps(comm, trainer, scenario, range(STEPS), save_after, out / "ckpt_2ranks")
        write_result(out, scenario, trainer, history, comm)
    trainer = make_trainer(comm, "gae", fsdp=False)
    write_result(out, "ddp", trainer, run_steps(comm, trainer, "gae", range(STEPS)), comm)
    trainer = make_trainer(comm, "gae")
    load_trainer(trainer, ckpt_1rank)
    write_result(out, "resumed_from_1", trainer, run_steps(comm, trainer, "gae", range(1, STEPS)), comm)
    destroy_process_group()
    # end without the interpreter's teardown, as the CLI's runs do (`cli._exit_now`): a clean-clone run saw a
    # rank abort there after all its results were written ("terminate called without an active exception")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

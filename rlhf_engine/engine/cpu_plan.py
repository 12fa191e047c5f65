"""Which cores and threads each process of a run gets: the trainer (this process) and every generator.

* **sync**: the generators wait while the trainer trains and the trainer waits while they generate, so each
  phase gets the whole machine: the trainer's torch intra-op threads = all cores, and each generator's
  vLLM worker bound to all cores too.
* **async**: generation and training overlap, so they split the cores: generator i gets its share from the
  front of the list, the trainer the rest (on 2 cores: generator core 0, trainer core 1, one thread each,
  the split the end-to-end benchmark measured). Fewer cores than processes: everyone gets every core.

How vLLM-CPU binds itself (vllm 0.32, `vllm/utils/ompmultiprocessing.py`): its worker (inside the
generator process by default, or a process of its own with the `mp` executor) pins its OpenMP threads one
per core by `VLLM_CPU_OMP_THREADS_BIND`; its default `auto` keeps one core of the allowed set for the scheduler
process (`VLLM_CPU_NUM_OF_RESERVED_CPU`), which on a 2-core machine leaves the worker ONE thread even when
the whole machine is free. The plan therefore gives each generator an explicit bind list (its cores) and
reserves none; the scheduler only runs between model steps.

Explicit engine options (`trainer_threads`, `trainer_cpus`, `generator_threads`, `generator_cpus`) win over
the plan. The trainer's settings are process state: `TrainerCpus` applies them and restores the previous
ones (an embedded engine leaves its host process as it found it).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CpuPlan:
    """Cores and threads of the trainer and of each generator (the same in every phase of the run)."""

    mode: str  # sync | async
    cpus: list[int]  # the cores this run may use
    trainer_cpus: list[int]
    trainer_threads: int
    generator_cpus: list[list[int]]
    generator_threads: list[int]

    def generator_env(self, i: int) -> dict[str, str]:
        """Environment of generator process i: its OpenMP threads and vLLM's worker binding."""
        return {
            "OMP_NUM_THREADS": str(self.generator_threads[i]),
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in self.generator_cpus[i]),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }

    def describe(self) -> dict:
        """The plan as JSON-ready data, phase by phase (for the run log and the benchmark JSON)."""
        gens = {f"generator-{i}": {"cpus": c, "threads": t}
                for i, (c, t) in enumerate(zip(self.generator_cpus, self.generator_threads))}
        trainer = {"cpus": self.trainer_cpus, "threads": self.trainer_threads}
        phases = ({"generate": gens, "train": {"trainer": trainer}} if self.mode == "sync"
                  else {"generate+train": {**gens, "trainer": trainer}})
        return {**asdict(self), "phases": phases}


def make_cpu_plan(
    mode: str,
    num_generators: int,
    cpus: list[int] | None = None,
    *,
    trainer_threads: int | None = None,
    trainer_cpus: list[int] | None = None,
    generator_threads: int | None = None,
    generator_cpus: list[list[int]] | None = None,
) -> CpuPlan:
    """The plan of a run (see the module docstring); `cpus` None: the cores this process may use."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if mode not in ("sync", "async"):
        raise ValueError(f"mode ({mode!r}) must be sync or async")
    if generator_cpus is not None and len(generator_cpus) != num_generators:
        raise ValueError(f"generator_cpus has {len(generator_cpus)} entries for {num_generators} generators")
    split = mode == "async" and num_generators >= 1 and len(cpus) > num_generators
    if split:
        share = max(1, (len(cpus) // 2) // num_generators)  # the generators take at most half the cores
        default_gen = [cpus[i * share : (i + 1) * share] for i in range(num_generators)]
        default_trainer = cpus[num_generators * share :]
    else:
        default_gen, default_trainer = [cpus] * num_generators, cpus
    gen_cpus = [list(c) for c in generator_cpus] if generator_cpus is not None else default_gen
    t_cpus = list(trainer_cpus) if trainer_cpus is not None else default_trainer
    return CpuPlan(
        mode=mode,
        cpus=cpus,
        trainer_cpus=t_cpus,
        trainer_threads=trainer_threads if trainer_threads is not None else len(t_cpus),
        generator_cpus=gen_cpus,
        generator_threads=[generator_threads if generator_threads is not None else len(c) for c in gen_cpus],
    )


class TrainerCpus:
    """Applies a plan's trainer cores and threads to this process; `restore` puts back the previous ones.

    Affinity is set on the calling thread (Linux `sched_setaffinity(0)`), before torch starts its pool."""

    def __init__(self, plan: CpuPlan) -> None:
        self._previous = (torch.get_num_threads(), sorted(os.sched_getaffinity(0)))
        os.sched_setaffinity(0, plan.trainer_cpus)
        torch.set_num_threads(plan.trainer_threads)
        self._restored = False

    def restore(self) -> None:
        """Idempotent."""
        if self._restored:
            return
        self._restored = True
        threads, cpus = self._previous
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)

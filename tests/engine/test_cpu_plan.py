"""The cpu plan: whole machine per phase in sync mode, a split in async mode, explicit options win, the
generator's vLLM binding, and the trainer's process settings restored."""

import os

import pytest
import torch

from rlhf_engine.engine.cpu_plan import TrainerCpus, make_cpu_plan


def test_sync_gives_each_phase_every_core():
    plan = make_cpu_plan("sync", 1, [0, 1])
    assert plan.trainer_cpus == [0, 1] and plan.trainer_threads == 2
    assert plan.generator_cpus == [[0, 1]] and plan.generator_threads == [2]
    assert plan.generator_env(0) == {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "0,1",
                                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert plan.describe()["phases"] == {"generate": {"generator-0": {"cpus": [0, 1], "threads": 2}},
                                         "train": {"trainer": {"cpus": [0, 1], "threads": 2}}}


def test_async_splits_the_cores():
    two = make_cpu_plan("async", 1, [0, 1])
    assert (two.generator_cpus, two.trainer_cpus, two.trainer_threads) == ([[0]], [1], 1)
    # 8 cores, 2 generators: the generators take half (2 each), the trainer the other half
    eight = make_cpu_plan("async", 2, list(range(8)))
    assert eight.generator_cpus == [[0, 1], [2, 3]] and eight.trainer_cpus == [4, 5, 6, 7]
    assert eight.describe()["phases"]["generate+train"]["trainer"] == {"cpus": [4, 5, 6, 7], "threads": 4}
    # more processes than cores: no split
    assert make_cpu_plan("async", 2, [0, 1]).trainer_cpus == [0, 1]


def test_explicit_options_win():
    plan = make_cpu_plan("sync", 1, [0, 1], trainer_threads=1, trainer_cpus=[1], generator_threads=1,
                         generator_cpus=[[0]])
    assert (plan.trainer_cpus, plan.trainer_threads, plan.generator_cpus, plan.generator_threads) == \
        ([1], 1, [[0]], [1])
    with pytest.raises(ValueError, match="generator_cpus has 1 entries for 2 generators"):
        make_cpu_plan("sync", 2, [0, 1], generator_cpus=[[0]])


def test_trainer_settings_are_restored():
    before = (torch.get_num_threads(), os.sched_getaffinity(0))
    cpus = sorted(before[1])
    threads = 3 if before[0] != 3 else 2
    applied = TrainerCpus(make_cpu_plan("sync", 1, cpus, trainer_cpus=[cpus[-1]], trainer_threads=threads))
    assert (torch.get_num_threads(), os.sched_getaffinity(0)) == (threads, {cpus[-1]})
    applied.restore()
    applied.restore()  # idempotent
    assert (torch.get_num_threads(), os.sched_getaffinity(0)) == before

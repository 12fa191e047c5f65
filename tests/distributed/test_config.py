"""Bad input of a multi-rank run: clear errors naming the setting, raised before anything starts."""

import pytest
import torch

from rlhf_engine.distributed import Comm, DistributedConfig, check_divisible, rank_info_from_env, shard_model
from rlhf_engine.distributed.group import launched_by_torchrun, resolve_backend
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer

RDZV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_rank_info_from_torchrun_env():
    info = rank_info_from_env(RDZV)
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert launched_by_torchrun(RDZV) and not launched_by_torchrun({})


def test_missing_rendezvous_variables_are_named():
    env = {k: v for k, v in RDZV.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    with pytest.raises(RuntimeError, match="rendezvous variables missing: MASTER_ADDR, MASTER_PORT"):
        rank_info_from_env(env)
    with pytest.raises(RuntimeError, match=r"RANK \(2\) must lie in \[0, WORLD_SIZE \(2\)\)"):
        rank_info_from_env({**RDZV, "RANK": "2"})
    with pytest.raises(RuntimeError, match="bad rendezvous variable"):
        rank_info_from_env({**RDZV, "MASTER_PORT": "x"})


def test_batch_must_divide_across_ranks():
    check_divisible(2, batch_size=8, mini_batch_size=4)
    with pytest.raises(ValueError, match=r"mini_batch_size \(6\) must be divisible by the number of trainer ranks \(4\)"):
        check_divisible(4, batch_size=12, mini_batch_size=6)
    with pytest.raises(ValueError, match=r"3 trainer ranks .* exceed ppo.batch_size \(2\)"):
        check_divisible(3, batch_size=2, mini_batch_size=2)


def test_config_values_are_checked():
    with pytest.raises(ValueError, match=r"trainer.backend \('mpi'\) must be one of auto, gloo, nccl"):
        DistributedConfig(backend="mpi")
    with pytest.raises(ValueError, match="mixed_precision='bf16' needs trainer.fsdp=true"):
        DistributedConfig(mixed_precision="bf16", fsdp=False)
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_mixed_precision_on_cpu_is_refused():
    with pytest.raises(RuntimeError, match="backend='nccl' needs CUDA"):
        resolve_backend("nccl")
    model = build_llama(TinyLlamaSpec(vocab_size=300, hidden_size=128, num_layers=1, num_heads=2,
                                      intermediate_size=256), build_tokenizer(300))
    with pytest.raises(ValueError, match="trainer.mixed_precision='bf16' needs CUDA .* this rank runs on cpu"):
        shard_model(model, DistributedConfig(mixed_precision="bf16"), Comm())


def test_trainer_device_setting():
    from rlhf_engine.distributed.group import resolve_device

    with pytest.raises(ValueError, match=r"trainer.device \('tpu'\) must be one of auto, cpu, cuda"):
        DistributedConfig(device="tpu")
    assert resolve_device(DistributedConfig(device="cpu")) == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(DistributedConfig()) == expected
    # the backend follows the trainer's device; a mismatch is named
    assert resolve_backend("auto", "cpu") == "gloo"
    with pytest.raises(RuntimeError, match="trainer.backend='gloo' does not serve a trainer on cuda"):
        resolve_backend("gloo", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_trainer_without_cuda_is_refused_naming_the_setting():
    from rlhf_engine.distributed.group import resolve_device

    with pytest.raises(RuntimeError, match="trainer.device='cuda' but this torch sees no CUDA device"):
        resolve_device(DistributedConfig(device="cuda"))

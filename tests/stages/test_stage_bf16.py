"""`bf16` in the SFT, reward and DPO stages: the forward passes (the DPO reference's too) run in bfloat16 under
autocast, the weights, optimizer and saved model stay fp32, and the losses match fp32's to bf16 precision."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.common.dtypes import cpu_has_native_bf16
from rlhf_engine.data import synthetic
from rlhf_engine.trainer.stages.dpo import DPOTrainer
from rlhf_engine.trainer.stages.dpo_config import DPOConfig
from rlhf_engine.trainer.stages.reward import RewardTrainer
from rlhf_engine.trainer.stages.reward_config import RewardConfig
from rlhf_engine.trainer.stages.sft import SFTTrainer
from rlhf_engine.trainer.stages.sft_config import SFTConfig

COMMON = dict(learning_rate=1e-3, per_device_train_batch_size=8, max_steps=2, logging_steps=1, eval_split=0.25,
              max_length=64, seed=0)


def sft(tiny_dir, out, **kw):
    return SFTTrainer(SFTConfig(model_name_or_path=str(tiny_dir), output_dir=str(out), **COMMON, **kw),
                      train_dataset=synthetic.sft_records(32))


def reward(tiny_dir, out, **kw):
    records = [{k: v for k, v in r.items() if k != "margin"} for r in synthetic.preference_records(32, min_gap=2)]
    return RewardTrainer(RewardConfig(model_name_or_path=str(tiny_dir), output_dir=str(out), **COMMON, **kw),
                         train_dataset=records)


def dpo(tiny_dir, out, **kw):
    return DPOTrainer(DPOConfig(model_name_or_path=str(tiny_dir), output_dir=str(out), **COMMON, **kw),
                      train_dataset=synthetic.preference_records(32, min_gap=2))


class LinearOutputDtypes:
    """The dtypes the model's linear layers produced while attached."""

    def __init__(self, model: torch.nn.Module):
        self.seen: set[torch.dtype] = set()
        self._hooks = [m.register_forward_hook(lambda _m, _i, out: self.seen.add(out.dtype))
                       for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()


@pytest.mark.parametrize("stage", [sft, reward, dpo], ids=["sft", "reward", "dpo"])
def test_bf16_forwards_in_bf16_and_keeps_fp32_weights_and_losses(stage, tiny_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = stage(tiny_dir, tmp_path / "bf16", bf16=True)
    emulated = [w for w in caught if "emulates bf16" in str(w.message)]
    assert len(emulated) == (0 if cpu_has_native_bf16() else 1)
    reference = stage(tiny_dir, tmp_path / "fp32")
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}

    dtypes = LinearOutputDtypes(trainer.model)
    first = trainer.evaluate()
    metrics = trainer.train()
    dtypes.detach()
    assert dtypes.seen == {torch.bfloat16}  # every linear layer ran in bf16, in training and evaluation alike
    want = reference.evaluate()
    for key, value in first.items():
        assert value == pytest.approx(want[key], rel=0.05, abs=0.02), key  # bf16 rounding, nothing else
    assert metrics["train/first_loss"] == pytest.approx(reference.train()["train/first_loss"], rel=0.05, abs=0.02)

    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_dpo_reference_logps_in_bf16_are_fp32_and_near_fp32s(tiny_dir, tmp_path):
    refs = [dpo(tiny_dir, tmp_path / str(bf16), bf16=bf16).ref_train for bf16 in (False, True)]
    assert refs[1].dtype == torch.float32 and refs[0].abs().min() > 1.0  # summed log-probs of real completions
    assert not torch.equal(refs[0], refs[1])  # the reference ran in bf16
    torch.testing.assert_close(refs[1], refs[0], rtol=0.02, atol=0.5)

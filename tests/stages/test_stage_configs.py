"""Stage configs: construction from mappings, unknown keys named, validation messages with values."""

import dataclasses

import pytest

from rlhf_engine.common.config_io import ConfigError, from_dict
from rlhf_engine.trainer.stages.dpo_config import DPOConfig
from rlhf_engine.trainer.stages.reward_config import RewardConfig
from rlhf_engine.trainer.stages.sft_config import SFTConfig


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, DPOConfig])
def test_every_field_is_documented_and_defaults_validate(cls):
    import ast
    import inspect

    cfg = cls()
    documented = set()
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                documented.add(node.target.id)
    assert {f.name for f in dataclasses.fields(cfg)} <= documented


def test_from_dict_and_kwargs():
    data = {"model_name_or_path": "m", "train_file": "t.jsonl", "packing": True, "max_length": 128,
            "learning_rate": 1e-4, "lr_scheduler_type": "cosine"}
    assert SFTConfig(**data) == from_dict(SFTConfig, data)
    assert SFTConfig(**data).output_dir == "runs/sft"


def test_unknown_keys_are_named():
    with pytest.raises(TypeError, match="unexpected keyword argument 'lerning_rate'"):
        RewardConfig(lerning_rate=1e-3)
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'reward.lerning_rate'"):
        from_dict(RewardConfig, {"lerning_rate": 1e-3}, source="run.yaml", prefix="reward")


@pytest.mark.parametrize("cls, kwargs, message", [
    (SFTConfig, {"packing": True, "max_length": None}, "packing=True needs max_length"),
    (SFTConfig, {"per_device_train_batch_size": 0}, r"per_device_train_batch_size \(0\) must be >= 1"),
    (SFTConfig, {"max_steps": 0}, r"max_steps \(0\) must be -1"),
    (SFTConfig, {"warmup_ratio": 1.5}, r"warmup_ratio \(1.5\) must be in \[0, 1\)"),
    (SFTConfig, {"eval_file": "e.jsonl", "eval_split": 0.1}, "give eval_file"),
    (SFTConfig, {"lr_scheduler_type": "step"}, r"lr_scheduler_type \('step'\)"),
    (RewardConfig, {"center_rewards_coefficient": -1.0}, r"center_rewards_coefficient \(-1.0\) must be >= 0"),
    (DPOConfig, {"beta": 0.0}, r"beta \(0.0\) must be > 0"),
    (DPOConfig, {"label_smoothing": 0.5}, r"label_smoothing \(0.5\) must be in \[0, 0.5\)"),
    (DPOConfig, {"loss_type": "ipo", "label_smoothing": 0.1}, "applies to loss_type 'sigmoid' only"),
])
def test_validation_messages_show_values(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_lr_schedule_warmup_then_decay():
    from rlhf_engine.trainer.schedule import lr_lambda

    f = lr_lambda("linear", warmup_steps=2, total_steps=6)
    assert [f(s) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    g = lr_lambda("cosine", warmup_steps=0, total_steps=4)
    assert [round(g(s), 6) for s in range(4)] == [1.0, round(0.5 * (1 + 2 ** -0.5), 6), 0.5, round(0.5 * (1 - 2 ** -0.5), 6)]
    assert lr_lambda("constant", 1, 10)(7) == 1.0

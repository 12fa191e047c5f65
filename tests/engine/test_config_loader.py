"""The YAML/--set config loader: types, unknown keys, nesting, overrides."""

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from rlhf_engine.common.config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["kl", "abs"] = "kl"
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr ({self.lr}) must be > 0")


@dataclass
class Outer:
    steps: int = 1
    name: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


def test_nested_values_convert_and_round_trip():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"lr": 1, "kind": "abs", "stop": ["\n"]}})
    assert cfg.steps == 3 and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.kind == "abs" and cfg.inner.stop == ["\n"]
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_path_and_file():
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key\(s\) 'inner.lrr'.*known keys: kind, lr, stop"):
        from_dict(Outer, {"inner": {"lrr": 1}}, source="run.yaml")


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"steps": "3"}, r"steps = '3' must be an integer"),
        ({"steps": True}, r"steps = True must be an integer"),
        ({"inner": {"lr": "fast"}}, r"inner.lr = 'fast' must be a number"),
        ({"inner": {"kind": "k9"}}, r"inner.kind = 'k9'; expected one of 'kl', 'abs'"),
        ({"inner": {"stop": "x"}}, r"inner.stop = 'x' must be a list"),
        ({"inner": 5}, r"inner must be a mapping"),
    ],
)
def test_wrong_types_are_named(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Outer, data, source="f.yaml")


def test_post_init_validation_is_reported_with_section():
    with pytest.raises(ConfigError, match=r"f.yaml: invalid inner: lr \(-1.0\) must be > 0"):
        from_dict(Outer, {"inner": {"lr": -1}}, source="f.yaml")


def test_overrides_parse_yaml_scalars_and_create_sections():
    data = apply_overrides({"inner": {"lr": 0.1}}, ["inner.lr=0.5", "steps=7", "name=run-a", "inner.stop=[a, b]"])
    cfg = from_dict(Outer, data)
    assert (cfg.inner.lr, cfg.steps, cfg.name, cfg.inner.stop) == (0.5, 7, "run-a", ["a", "b"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["inner.lr"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(bad)
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_errors_name_file_line_and_the_real_field_of_an_optional_section(tmp_path):
    from dataclasses import dataclass

    from rlhf_engine.common.config_io import yaml_lines

    @dataclass
    class Inner:
        lr: float = 1.0

    @dataclass
    class Top:
        inner: Inner | None = None
        steps: int = 1

    path = tmp_path / "run.yaml"
    path.write_text("steps: 2\ninner:\n  lr: fast\n")
    assert yaml_lines(path) == {"steps": 1, "inner": 2, "inner.lr": 3}
    with pytest.raises(ConfigError) as e:
        from_dict(Top, load_yaml(path), source=str(path), lines=yaml_lines(path))
    assert str(e.value) == f"{path}:3: inner.lr = 'fast' must be a number"
    path.write_text("steps: 2\ninner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: unknown key\(s\) 'inner.lrr'"):
        from_dict(Top, load_yaml(path), source=str(path), lines=yaml_lines(path))


@pytest.mark.parametrize("engine, data, generator, message", [
    ({"mode": "sync", "streaming": True}, {}, {},
     "engine.streaming needs engine.mode: async"),
    ({"mode": "async", "max_staleness": 1, "streaming": True}, {}, {},
     "engine.streaming needs max_staleness >= 2 (got 1)"),
    ({}, {"max_new_tokens_field": "budget"}, {"environment": "rlhf_engine.envs.guess_number:GuessNumber"},
     "data.max_new_tokens_field ('budget') gives single-turn prompts a budget"),
])
def test_run_settings_that_do_not_go_together_are_one_error(tmp_path, engine, data, generator, message):
    from _runs import run_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config(tmp_path, tmp_path / "policy", tmp_path / "p.jsonl", backend="vllm", generator=generator,
                   data=data, **engine)


def test_streaming_hands_out_max_staleness_batches_ahead(tmp_path):
    from _runs import run_config

    def ahead(**engine):
        return run_config(tmp_path, tmp_path / "policy", tmp_path / "p.jsonl", backend="vllm",
                          **engine).engine.batches_in_flight

    assert (ahead(mode="sync"), ahead(mode="async", max_staleness=3),
            ahead(mode="async", max_staleness=3, streaming=True)) == (1, 4, 3)

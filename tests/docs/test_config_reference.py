"""The configuration reference is generated from the config dataclasses' field docstrings
(`docs/gen_config_reference.py`): every field appears with its docstring, and an undocumented field
is an error, so the docs cannot silently fall behind the code."""

import ast
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from rlhf_engine import PPOConfig
from rlhf_engine.models.lora import LoraConfig

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _field_docs(path: Path, class_name: str) -> dict[str, str]:
    """{field: docstring as written} of a class, read independently of the generator."""
    cls = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    docs = {}
    for stmt, after in zip(cls.body, cls.body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[stmt.target.id] = after.value.value
    return docs


def test_every_ppo_config_field_appears_with_its_docstring():
    page = gen.generate()
    path = ROOT / "rlhf_engine" / "trainer" / "ppo" / "config.py"
    docs = _field_docs(path, "PPOConfig")
    fields = [f.name for f in dataclasses.fields(PPOConfig)]
    assert sorted(docs) == sorted(fields)  # every field of the real class has a docstring
    section = page[page.index("### PPOConfig"):]
    section = section[:section.index("\n## ")]
    for name in fields:
        assert f"`{name}`: " in section, name
        assert gen._clean(docs[name]) in section, name


def test_types_defaults_and_nested_links():
    page = gen.generate()
    # LoraConfig.r: int = 16; target_modules' default comes from its default_factory lambda
    assert "`r`: `int`, default `16`" in page
    assert "`target_modules`: `list[str] | str`, default `['q_proj', 'k_proj', 'v_proj', 'o_proj']`" in page
    assert LoraConfig().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # a required field, and a nested config linked to its own section
    assert "`policy`: `str`, required" in page
    assert "`lora`: `LoraConfig | None`, default `None`" in page
    assert "[LoraConfig](#loraconfig)" in page
    assert "### LoraConfig {#loraconfig}" in page
    # a stage config points at the fields it inherits
    assert "Also every field of [StageConfig](#stageconfig)" in page


def test_every_documented_class_is_covered():
    page = gen.generate()
    for _, _, names, _ in gen.SECTIONS:
        for name in names:
            assert f"### {name} {{#{name.lower()}}}" in page


def test_a_field_without_a_docstring_is_an_error(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "cfg.py").write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Cfg:\n"
        '    """A config."""\n\n'
        "    documented: int = 1\n"
        '    """Has one."""\n'
        "    bare: float = 2.0\n"
    )
    with pytest.raises(gen.MissingDocstring, match=r"pkg\.cfg\.Cfg\.bare"):
        gen.collect([("Test", "pkg.cfg", ("Cfg",), "about")], root=tmp_path)


def test_a_class_that_is_gone_is_an_error(tmp_path):
    (tmp_path / "cfg.py").write_text("class Other:\n    pass\n")
    with pytest.raises(LookupError, match="has no class Cfg"):
        gen.collect([("Test", "cfg", ("Cfg",), "about")], root=tmp_path)

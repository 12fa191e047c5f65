"""Writes the configuration reference (`reference/configuration.md`) from the config dataclasses'
source: every field with its type, default and docstring (the string literal right after the field).

The classes are read with `ast` from their files, never imported, so the docs build needs no torch.
A field without a docstring is an error: the reference cannot silently fall behind the code.

Run by mkdocs through `hooks:` in mkdocs.yml (`on_files` adds the page); `python docs/gen_config_reference.py`
prints it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = "reference/configuration.md"

# (section title, module, classes in the order they are shown, what the section configures)
SECTIONS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("Run config", "rlhf_engine.engine.config", ("RunConfig", "ModelConfig", "DataConfig", "EngineConfig"),
     "The YAML file of `rlhf-engine ppo` (`load_run_config`): one section per dataclass."),
    ("PPO", "rlhf_engine.trainer.ppo.config", ("PPOConfig",), "The `ppo:` section, and `PPOTrainer(config=...)`."),
    ("Generator", "rlhf_engine.rollout.config", ("GeneratorConfig", "SamplingConfig"), "The `generator:` section."),
    ("Transport", "rlhf_engine.transport.config", ("TransportConfig",), "The `transport:` section."),
    ("Trainer ranks", "rlhf_engine.distributed.config", ("DistributedConfig",), "The `trainer:` section."),
    ("LoRA", "rlhf_engine.models.lora", ("LoraConfig",), "`model.lora` of a run, and `lora` of a stage config."),
    ("Stages", "rlhf_engine.trainer.stages.base", ("StageConfig",),
     "Fields shared by the SFT, reward and DPO stages (`rlhf-engine sft|reward|dpo --config FILE`)."),
    ("SFT", "rlhf_engine.trainer.stages.sft_config", ("SFTConfig",), "`rlhf-engine sft`."),
    ("Reward model", "rlhf_engine.trainer.stages.reward_config", ("RewardConfig",), "`rlhf-engine reward`."),
    ("DPO", "rlhf_engine.trainer.stages.dpo_config", ("DPOConfig",), "`rlhf-engine dpo`."),
]


class MissingDocstring(ValueError):
    """A config field has no docstring (or a class none)."""


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    default: str | None  # None: required
    doc: str
    classes: tuple[str, ...]  # config classes named by the type or the default


@dataclass(frozen=True)
class ConfigClass:
    name: str
    module: str
    bases: tuple[str, ...]
    doc: str
    fields: tuple[Field, ...]


def module_path(module: str, root: Path = ROOT) -> Path:
    """The source file of a module of this repository, from its dotted name."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no source file for module {module} (looked for {base}.py and {base}/__init__.py)")


def _clean(doc: str) -> str:
    """A docstring as one paragraph of Markdown (its lines joined; reST ``x`` as `x`)."""
    return " ".join(line.strip() for line in doc.strip().splitlines() if line.strip()).replace("``", "`")


def _default(value: ast.expr | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        for kw in value.keywords:
            if kw.arg == "default":
                return ast.unparse(kw.value)
            if kw.arg == "default_factory":
                factory = kw.value
                if isinstance(factory, ast.Lambda):
                    return ast.unparse(factory.body)
                return ast.unparse(factory) + "()"
        return None
    return ast.unparse(value)


def _string(node: ast.stmt | None) -> str | None:
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return node.value.value
    return None


def parse_classes(path: Path, module: str) -> dict[str, ConfigClass]:
    """Every class of the file with its annotated fields (a field's docstring: the string right after it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = []
        body = node.body
        for i, stmt in enumerate(body):
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            if ast.unparse(stmt.annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            doc = _string(body[i + 1]) if i + 1 < len(body) else None
            names = tuple(n.id for part in (stmt.annotation, stmt.value) if part is not None
                          for n in ast.walk(part) if isinstance(n, ast.Name))
            fields.append(Field(stmt.target.id, ast.unparse(stmt.annotation), _default(stmt.value),
                                _clean(doc) if doc is not None else "", names))
        found[node.name] = ConfigClass(node.name, module, tuple(ast.unparse(b) for b in node.bases),
                                       _clean(ast.get_docstring(node) or ""), tuple(fields))
    return found


def collect(sections=SECTIONS, root: Path = ROOT) -> list[tuple[str, str, list[ConfigClass]]]:
    """The sections with their classes; `MissingDocstring` naming every undocumented field at once."""
    out, missing = [], []
    documented: dict[str, ConfigClass] = {}
    for title, module, names, about in sections:
        path = module_path(module, root)
        classes = parse_classes(path, module)
        for name in names:
            if name not in classes:
                raise LookupError(f"{module} ({path}) has no class {name}; its classes: {sorted(classes)}")
            documented[name] = classes[name]
        out.append((title, about, [classes[n] for n in names]))
    for _, _, classes in out:
        for cls in classes:
            if not cls.doc:
                missing.append(f"{cls.module}.{cls.name} (the class)")
            for f in cls.fields:
                # a section field (`ppo: PPOConfig`) may rely on its class's docstring
                if not f.doc and not (f.type in documented and documented[f.type].doc):
                    missing.append(f"{cls.module}.{cls.name}.{f.name}")
    if missing:
        raise MissingDocstring("config fields without a docstring (write one, a string literal right after the "
                               "field): " + ", ".join(missing))
    return out


def _anchor(name: str) -> str:
    return name.lower()


def _code(text: str) -> str:
    """`text` as an inline code span (widened when the text holds backticks)."""
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render(sections) -> str:
    documented = {cls.name: cls for _, _, classes in sections for cls in classes}
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `docs/gen_config_reference.py` when the site is built: every",
        "field's type, default and docstring as the code has them. In YAML, a section is a mapping of these",
        "fields (`ppo: {batch_size: 64}`); on the command line, `--set section.field=value`. Unknown keys and",
        "wrong types are errors that name the key and the file.",
        "",
    ]
    for title, about, classes in sections:
        lines += [f"## {title}", "", about, ""]
        for cls in classes:
            lines += [f"### {cls.name} {{#{_anchor(cls.name)}}}", "", f"`{cls.module}.{cls.name}`: {cls.doc}", ""]
            inherited = [b for b in cls.bases if b in documented]
            if inherited:
                lines += ["Also every field of " + ", ".join(f"[{b}](#{_anchor(b)})" for b in inherited)
                          + "; the fields below are its own or override a default.", ""]
            for f in cls.fields:
                default = "required" if f.default is None else "default " + _code(f.default)
                term = f"{_code(f.name)}: {_code(f.type)}, {default}"
                links = [n for n in dict.fromkeys(f.classes) if n in documented and n != cls.name]
                doc = f.doc or documented[f.type].doc
                if links:
                    doc += " See " + ", ".join(f"[{n}](#{_anchor(n)})" for n in links) + "."
                lines += [term, f":   {doc}", ""]
    return "\n".join(lines)


def generate(sections=SECTIONS, root: Path = ROOT) -> str:
    """The configuration reference page, as Markdown."""
    return render(collect(sections, root))


EXAMPLES = "examples"


def on_files(files, config):
    """mkdocs hook: adds the generated page, and the examples' READMEs (and their images) from `examples/`
    as they are, under `examples/` of the site, so that pages link to them instead of copying them."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    try:
        page = generate()
    except (MissingDocstring, LookupError, FileNotFoundError) as e:
        raise PluginError(f"{Path(__file__).name}: {e}") from e  # one line, no traceback
    files.append(File.generated(config, PAGE, content=page))
    for path in sorted((ROOT / EXAMPLES).glob("*/*")):
        if path.name == "README.md" or path.suffix == ".png":
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


if __name__ == "__main__":
    print(generate())

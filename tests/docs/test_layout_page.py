"""docs/development/layout.md names every module of the package, and only modules that exist, so a
newcomer can find any file from it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "development" / "layout.md"


def test_layout_page_names_every_module_and_only_existing_ones():
    named = set(re.findall(r"^\| `([\w/]+\.py)` \|", PAGE.read_text(), flags=re.M))
    package = ROOT / "rlhf_engine"
    # every module, and of the package markers only the top one (the public names)
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if p.name != "__init__.py" or p.parent == package}
    assert sorted(named - modules) == [], "the layout page names modules that do not exist"
    assert sorted(modules - named) == [], "modules missing from docs/development/layout.md"

"""The README's "How the code is laid out" section names every module, and only modules that exist."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def layout_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## How the code is laid out")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_every_module_has_its_line_and_every_line_its_module():
    named = set(re.findall(r"`([a-z_]+\.py)`", layout_section()))
    modules = {path.name for path in REPO_ROOT.glob("*.py")}
    assert modules - named == set(), "modules missing from the README's layout section"
    assert named - modules == set(), "the README's layout section names modules that do not exist"

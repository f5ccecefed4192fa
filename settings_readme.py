"""The README's settings table, generated from the settings' declarations in :mod:`config`.

``python config.py --update-readme`` rewrites the table between two marker lines; a test fails
while the README and the declarations differ. This module knows the table's layout and the
markers; :mod:`config` passes it the declarations (it imports nothing from the project but
``errors``, so that ``config`` can import it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from errors import ConfigError

README = Path(__file__).resolve().parent / "README.md"
TABLE_START = "<!-- settings table: generated from config.py by `python config.py --update-readme` -->"
TABLE_END = "<!-- end of the generated settings table -->"


def render_table(variables: Iterable[Any], is_placeholder: Callable[[str | None], bool]) -> str:
    """The Configuration table (Markdown), one row per declared setting (``config.Setting``)."""
    lines = ["| Variable | Default | Values | Meaning |", "|---|---|---|---|"]
    for var in variables:
        default = var.default_doc or ("(none)" if var.default is None else f"`{var.default}`")
        doc = var.doc
        if var.example is not None and not var.secret and not is_placeholder(var.example):
            doc += f" (`.env.example`: `{var.example}`)"
        cells = (f"`{var.name}`", default, var.parse.values, doc)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def readme_settings_table(readme_text: str) -> str | None:
    """The generated table as it stands in a README's text (None when the markers are missing)."""
    start, end = readme_text.find(TABLE_START), readme_text.find(TABLE_END)
    if start < 0 or end < start:
        return None
    return readme_text[start + len(TABLE_START):end].strip("\n") + "\n"


def rewrite_table(path: str | os.PathLike[str], table: str) -> bool:
    """Put ``table`` between the README's markers; True when the file changed."""
    target = Path(path)
    text = target.read_text(encoding="utf-8")
    if readme_settings_table(text) is None:
        raise ConfigError(f"{target} has no generated settings table.",
                          hint=f"Fix: put the two marker lines around the table:\n{TABLE_START}\n{TABLE_END}")
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    new = f"{before}{TABLE_START}\n{table}{TABLE_END}{after}"
    if new == text:
        return False
    target.write_text(new, encoding="utf-8")
    return True

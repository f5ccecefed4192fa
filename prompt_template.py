"""Prompt templates: placeholders, parsing, checking, loading from files.

A template is text with placeholders: ``{name}`` is substituted, ``{{name}}``
writes ``{name}`` literally, and any other brace (JSON, code, ``{ }``) stays as
written. Which names exist depends on the mode; the single-question prompt
knows :data:`PLACEHOLDERS`. A mode may also accept dotted placeholders for
some names (``fields``): ``{row.price}`` is the slot ``row`` with the field
``price`` (anything up to the closing brace). A dotted placeholder whose name
does not take fields stays literal text, as it always has. An unknown
``{name}`` is an error that names it, suggests the closest known one and
says how to write it literally; every unknown name is reported at once.

:func:`parse_template` returns a :class:`Template`: literal text and
:class:`Slot` objects in order. :meth:`Template.split` substitutes every slot
but one (the data) and returns the literal runs around that one, which is
what the row packer needs as the frame of a prompt.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from errors import PromptError

#: The single-question prompt's placeholders.
PLACEHOLDERS = ("data", "context", "row_count", "columns", "query")

# {{name}} / {{name.field}} is an escaped literal; {name} / {name.field} a placeholder.
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_FIELD = r"[^{}\n]+"
_SLOT = re.compile(rf"\{{\{{({_NAME})(?:\.({_FIELD}))?\}}\}}|\{{({_NAME})(?:\.({_FIELD}))?\}}")


@dataclass(frozen=True)
class Slot:
    """One placeholder: ``{name}`` or, for names that take fields, ``{name.field}``."""

    name: str
    field: str | None = None

    @property
    def key(self) -> str:
        """``"name"`` or ``"name.field"``: the key of its value in :meth:`Template.split`."""
        return self.name if self.field is None else f"{self.name}.{self.field}"


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and :class:`Slot` objects, never two literals in a row."""

    parts: tuple[str | Slot, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Slot names in order of first use."""
        return tuple(dict.fromkeys(p.name for p in self.parts if isinstance(p, Slot)))

    def split(self, values: Mapping[str, str], at: str = "data") -> tuple[str, ...]:
        """The text around each ``{at}`` slot, with every other slot replaced by ``values[slot.key]``.

        Substituted values are inserted as they are and never scanned again.
        The result has one more element than there are ``{at}`` slots.
        """
        runs: list[str] = []
        current: list[str] = []
        for part in self.parts:
            if isinstance(part, Slot) and part.name == at and part.field is None:
                runs.append("".join(current))
                current = []
            else:
                current.append(values[part.key] if isinstance(part, Slot) else part)
        runs.append("".join(current))
        return tuple(runs)


def parse_template(
    template: str, *, names: Sequence[str] = PLACEHOLDERS, fields: Collection[str] = ()
) -> Template:
    """Parse ``template`` against the known ``names`` (``fields``: names that take ``.field``).

    Raises:
        PromptError: the template is not text, or uses unknown placeholders.
    """
    if not isinstance(template, str):
        raise PromptError(f"A template must be text, not {type(template).__name__}")
    parts: list[str | Slot] = []
    literal: list[str] = []
    unknown: list[str] = []
    pos = 0
    for match in _SLOT.finditer(template):
        escaped, escaped_field, name, field = match.groups()
        literal.append(template[pos : match.start()])
        pos = match.end()
        if escaped is not None:
            # {{name}} writes {name}; a dotted one only when its name takes fields.
            keep = escaped_field is None or escaped in fields
            literal.append(match.group()[1:-1] if keep else match.group())
        elif field is not None and name not in fields:
            literal.append(match.group())
        elif name in names:
            if literal and "".join(literal):
                parts.append("".join(literal))
            literal = []
            parts.append(Slot(name, field))
        elif name not in unknown:
            unknown.append(name)
    literal.append(template[pos:])
    if "".join(literal):
        parts.append("".join(literal))
    if unknown:
        raise _unknown_error(unknown, names)
    return Template(tuple(parts))


def _unknown_error(unknown: Sequence[str], names: Sequence[str]) -> PromptError:
    guesses = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        guesses.append(f"{{{name}}}" + (f" (did you mean {{{close[0]}}}?)" if close else ""))
    label = "placeholder" if len(unknown) == 1 else "placeholders"
    known = ", ".join("{" + n + "}" for n in names)
    return PromptError(
        f"Unknown {label} in the template: {', '.join(guesses)}",
        hint=f"Known placeholders: {known}. To write braces literally, double them: {{{{{unknown[0]}}}}}.",
    )


def check_template(template: str) -> tuple[str, ...]:
    """Return the placeholders ``template`` uses, in order; raise PromptError for unknown ones."""
    return parse_template(template).names


def load_template(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 template file (a leading BOM is dropped) and check its placeholders."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise PromptError(f"Template file not found: {os.fspath(path)}", hint="Check the path.") from None
    except IsADirectoryError:
        raise PromptError(f"Template path is a folder, not a file: {os.fspath(path)}") from None
    except UnicodeDecodeError as exc:
        raise PromptError(
            f"Template file is not valid UTF-8: {os.fspath(path)} (byte {exc.start})",
            hint="Save the template as UTF-8.",
        ) from None
    except OSError as exc:
        raise PromptError(f"Cannot read template file {os.fspath(path)}: {exc.strerror or exc}") from None
    try:
        parse_template(text)
    except PromptError as exc:
        raise PromptError(f"{os.fspath(path)}: {exc.message}", hint=exc.hint) from None
    return text

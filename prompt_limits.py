"""What a user can change when a prompt does not fit: the hint of the "prompt too long" errors.

The errors are raised deep in the prompt builder, but the fix is on the command line or in
``.env``, so the hint names the flags and settings that set the prompt's size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from row_packer import PromptBudget

#: What to shorten when the text around the rows alone is too long.
FRAME_TOO_LONG = "shorten the --template, the --context or the --system-prompt;"


def budget_fix(budget: PromptBudget, text: str, first: str) -> str:
    """The hint for ``text`` over ``budget``: ``first`` (what to shorten), then the limits to raise."""
    limits = []
    if budget.count(text) + (budget.outside_tokens() if budget.frame.outside else 0) > budget.max_tokens:
        limits.append(f"--prompt-budget (now {budget.max_tokens:,} tokens; the default is MODEL_CONTEXT_TOKENS "
                      "minus MAX_NEW_TOKENS minus a margin: raise MODEL_CONTEXT_TOKENS if the model's window "
                      "allows, or lower MAX_NEW_TOKENS)")
    if budget.max_chars is not None and len(text) > budget.max_chars:
        limits.append(f"--prompt-max-chars (now {budget.max_chars:,})")
    raise_them = f"\n     or raise {' and '.join(limits)}." if limits else ""
    return f"Fix: {first}{raise_them}\n     (--prompt-rows and --max-cell-chars bound the rows and each value.)"

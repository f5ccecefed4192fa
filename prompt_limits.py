"""The prompt's size: the default budget (the window minus the answer), and what a user can change
when a prompt does not fit (the hint of the "prompt too long" errors).

The errors are raised deep in the prompt builder, but the fix is on the command line or in
``.env``, so the hint names the flags and settings that set the prompt's size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from errors import PromptError

if TYPE_CHECKING:
    from row_packer import PromptBudget

#: Phi-4's window, shared by the prompt and the answer.
DEFAULT_CONTEXT_TOKENS = 16384
#: The default answer length (``MAX_NEW_TOKENS``).
DEFAULT_MAX_NEW_TOKENS = 512
#: Kept free for the chat template's own tokens (``<|im_start|>user<|im_sep|>`` ...).
DEFAULT_RESERVE_TOKENS = 64
#: Per-value limit used by :func:`build_prompt` unless told otherwise.
DEFAULT_MAX_CELL_CHARS = 500


def default_token_budget(
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    reserve: int = DEFAULT_RESERVE_TOKENS,
) -> int:
    """Tokens left for the user prompt: the window minus the answer and a reserve.

    The reserve covers the chat template's role markers; the system prompt, if
    any, is subtracted separately by :func:`build_prompt`.
    """
    for name, value in (("context_tokens", context_tokens), ("max_new_tokens", max_new_tokens), ("reserve", reserve)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PromptError(f"{name} must be a non-negative integer, got {value!r}")
    budget = context_tokens - max_new_tokens - reserve
    if budget <= 0:
        raise PromptError(
            f"No room for a prompt: context of {context_tokens:,} tokens minus {max_new_tokens:,} "
            f"for the answer and {reserve:,} reserved leaves {budget:,}",
            hint="Fix: lower MAX_NEW_TOKENS (or --max-new-tokens), or raise MODEL_CONTEXT_TOKENS if the model's window is larger.",
        )
    return budget


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

"""What ``--all-rows`` prints: the plan of a dry run, its time estimate, the statistics line.

The time estimate divides the work by the servers' capacity. Per call it assumes
:data:`PROMPT_TOKENS_PER_SECOND` to read the prompt and :data:`GENERATED_TOKENS_PER_SECOND` to
write an answer of the full ``MAX_NEW_TOKENS`` (Phi-4 14B, 4-bit, on one consumer GPU);
when the checkpoint holds calls of an earlier run of the job, their measured time replaces
that assumption.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from mr_checkpoint import load_answers
from mr_result import MapReduceRun
from progress import format_duration

#: Assumed prompt reading speed of one request, tokens per second.
PROMPT_TOKENS_PER_SECOND = 1000.0
#: Assumed generation speed of one request, tokens per second.
GENERATED_TOKENS_PER_SECOND = 25.0


def _measured_call_seconds(run: MapReduceRun) -> float | None:
    """The median wall time of the calls an earlier run recorded, if any."""
    if not run.checkpoint_path:
        return None
    answers, _, _ = load_answers(Path(run.checkpoint_path), run.fingerprint)
    times = [r["stats"]["wall_time"] for r in answers.values()
             if isinstance(r.get("stats"), dict) and isinstance(r["stats"].get("wall_time"), (int, float))]
    return statistics.median(times) if times else None


def estimate_seconds(run: MapReduceRun, capacity: int) -> float:
    """Seconds the calls still to do would take at ``capacity`` requests at once."""
    answer = run.max_new_tokens or 0
    measured = _measured_call_seconds(run)

    def seconds(prompt_tokens: int) -> float:
        if measured is not None:
            return measured
        return prompt_tokens / PROMPT_TOKENS_PER_SECOND + answer / GENERATED_TOKENS_PER_SECOND

    share_left = 1 - run.reusable / len(run.map_calls) if run.map_calls else 0
    total = share_left * sum(seconds(c.prompt_tokens) for c in run.map_calls) / capacity
    for calls in run.expected_levels or []:  # levels run one after another
        total += math.ceil(calls / capacity) * seconds(run.budget or 0)
    return round(total, 1)


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def plan_text(run: MapReduceRun, capacity: int | None, found: str, estimate: float | None) -> str:
    """The dry run's plan, for stdout."""
    calls = run.map_calls
    levels = run.expected_levels or []
    shortened = run.shortened_rows()
    lines = ["Plan: one question over every row, in several calls (dry run: nothing was sent)"]

    def add(label: str, text: str) -> None:
        lines.append(f"  {label:<15}  {text}")

    more = " (the query returned more: --max-rows cut it)" if run.more_rows else ""
    add("rows", f"{run.rows_total:,}{more}, read in {run.read_time or 0:.2f} s")
    add("prompts", f"up to {run.budget or 0:,} tokens each, counted with {run.counter}")
    add("map calls", f"{len(calls):,}: {_span([c.last_row - c.first_row + 1 for c in calls])} rows and "
        f"{_span([c.prompt_tokens for c in calls])} tokens each, {sum(c.prompt_tokens for c in calls):,} tokens in all")
    add("shortened rows", "none" if not shortened else
        f"{len(shortened):,} (too large for one prompt; values cut: "
        + ", ".join(f"row {s['row']:,} to {s['max_cell_chars']:,} chars" for s in shortened[:5])
        + (", ..." if len(shortened) > 5 else "") + ")")
    reduce_calls = sum(levels)
    reduce_tokens = sum(run.expected_reduce_tokens)
    add("reduce", f"{len(levels)} level{'s' if len(levels) != 1 else ''} expected: "
        f"{' + '.join(f'{n:,}' for n in levels) or '0'} call{'s' if reduce_calls != 1 else ''} (answers of up to "
        f"{run.max_new_tokens or 0:,} tokens; {run.fan_in or 0:,} fit one reduce prompt)"
        + (f", up to {reduce_tokens:,} tokens in all" if reduce_tokens else ""))
    expected = run.expected_tokens() or {"prompt": 0, "generated": 0}
    add("calls in all", f"{len(calls) + sum(levels):,}: up to {expected['prompt']:,} prompt tokens and "
        f"{expected['generated']:,} generated")
    if capacity and estimate is not None:
        basis = ("the median time of this job's earlier calls" if _measured_call_seconds(run) is not None else
                 f"{PROMPT_TOKENS_PER_SECOND:,.0f} prompt tokens/s and {GENERATED_TOKENS_PER_SECOND:,.0f} "
                 "generated tokens/s per call, answers of full length")
        add("time", f"about {format_duration(estimate)} at {capacity} call{'s' if capacity != 1 else ''} at once "
            f"({found}; assuming {basis})")
    else:
        add("time", f"not estimated: {found}")
    if run.checkpoint_path:
        add("checkpoint", f"{run.checkpoint_path}: {run.reusable:,} of {len(calls):,} map answers would be reused")
    if run.sample_prompt:
        lines += ["", "First map prompt:", run.sample_prompt]
    return "\n".join(lines)


def stats_line(run: MapReduceRun) -> str:
    """One line for stderr after a finished run."""
    stats = run.stats()
    reused = f", {stats['calls_reused']:,} reused" if stats.get("calls_reused") else ""
    levels = stats.get("reduce_levels", 0)
    parts = [f"rows {stats.get('rows_shown', 0):,}/{run.rows_total:,}" + ("+" if run.more_rows else ""),
             f"{stats.get('map_calls', 0):,} map + {stats.get('reduce_calls', 0):,} reduce calls in {levels} "
             f"level{'s' if levels != 1 else ''}{reused}",
             f"prompts {stats.get('prompt_tokens', 0):,} tokens"]
    if stats.get("protocol"):
        parts.append(f"{stats['protocol']}:{stats.get('model') or '?'}")
    if isinstance(stats.get("wall_time"), (int, float)):
        timing = f"time {stats['wall_time']:.1f} s"
        if isinstance(stats.get("generation_time"), (int, float)):
            timing += f" (generation {stats['generation_time']:.1f} s over all calls)"
        parts.append(timing)
    tokens = [f"{label} {stats[key]:,}" for key, label in (("input_tokens", "in"), ("generated_tokens", "out"))
              if isinstance(stats.get(key), int)]
    if tokens:
        parts.append("tokens " + " / ".join(tokens))
    if stats.get("answers_cut"):
        parts.append(f"{stats['answers_cut']:,} answer{'s' if stats['answers_cut'] != 1 else ''} cut at "
                     "MAX_NEW_TOKENS")
    if stats.get("rows_shortened"):
        parts.append(f"{stats['rows_shortened']:,} row{'s' if stats['rows_shortened'] != 1 else ''} shortened")
    return " | ".join(parts)

"""The record of one question over every row: the plan, every call and its answer, the summed statistics.

:class:`MapReduceRun` is filled as the run goes (rows read, then the map calls planned, then
answers as they arrive, then the reduce levels), so after an error or Ctrl-C it still says how
far the run got. :meth:`MapReduceRun.stats` sums the statistics over every call;
:meth:`MapReduceRun.plan` is the plan as it was run, for ``--json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mr_calls import Call, answer_was_cut
from runner import RunResult

# Statistics of one call that add up over calls.
SUMMED = ("generation_time", "input_tokens", "generated_tokens", "total_tokens")


@dataclass
class MapReduceRun:
    """One ``--all-rows`` run, filled in as it goes; see the module docstring."""

    query: str
    columns: list[str] = field(default_factory=list)
    rows_total: int = 0
    more_rows: bool = False  # --max-rows cut the result
    read_time: float | None = None  # seconds the database read took (its transaction was open that long)
    fingerprint: str = ""
    #: Every row fitted the single-question prompt: the run as it is without --all-rows, one call.
    single: RunResult | None = None
    budget: int | None = None  # tokens per prompt
    counter: str | None = None  # the token counter's name
    max_new_tokens: int | None = None
    fan_in: int | None = None  # answers of full length one reduce prompt holds
    #: Reduce calls per level expected when every answer has max_new_tokens tokens (None: never ends).
    expected_levels: list[int] | None = None
    #: Prompt tokens of each expected reduce level, at most (answers of max_new_tokens tokens).
    expected_reduce_tokens: list[int] = field(default_factory=list)
    map_calls: list[Call] = field(default_factory=list)
    map_planned: bool = False  # every chunk is packed: map_calls is the whole map level
    sample_prompt: str | None = None  # the first map prompt, for the dry run
    levels: list[list[Call]] = field(default_factory=list)  # reduce levels, one entry per group
    answer: str | None = None
    concurrency: int | None = None
    checkpoint_path: str | None = None
    checkpoint_notice: str | None = None
    reusable: int = 0  # answers of this job found in the checkpoint
    token_check: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)  # reported once the run ends
    total_time: float | None = None

    @property
    def queried(self) -> bool:
        return self.read_time is not None

    @property
    def fits_one_prompt(self) -> bool:
        return self.single is not None

    @property
    def complete(self) -> bool:
        return self.answer is not None

    def calls(self) -> list[Call]:
        """Every model call of the plan so far: the map calls, then each level's reduce calls."""
        return self.map_calls + [c for level in self.levels for c in level if not c.carried]

    def shortened_rows(self) -> list[dict[str, int]]:
        return [cut for call in self.map_calls for cut in call.shortened]

    def answers_done(self) -> tuple[int, int]:
        """``(map answers obtained, map calls planned)``."""
        return sum(1 for c in self.map_calls if c.answer is not None), len(self.map_calls)

    def stats(self) -> dict[str, Any]:
        """Every figure known so far, flat; model statistics summed over every answered call."""
        if self.single is not None:
            stats = self.single.stats()
            stats.update(calls=1, fits_one_prompt=True)
            return stats
        stats: dict[str, Any] = {}
        if self.queried:
            stats.update(rows_total=self.rows_total, rows_shown=self.rows_total if self.map_calls else 0,
                         more_rows=self.more_rows, truncated=False, db_time=self.read_time)
        if self.map_calls:
            stats.update(self._call_stats())
        if self.total_time is not None:
            stats["total_time"] = self.total_time
        return stats

    def _call_stats(self) -> dict[str, Any]:
        calls = self.calls()
        answered = [c for c in calls if c.answer is not None]
        stats: dict[str, Any] = {
            "fits_one_prompt": False, "rows_shortened": len(self.shortened_rows()),
            "map_calls": len(self.map_calls), "reduce_calls": len(calls) - len(self.map_calls),
            "reduce_levels": len(self.levels), "calls_answered": len(answered),
            "calls_reused": sum(1 for c in answered if c.reused),
            "calls_sent": sum(1 for c in answered if not c.reused),
            "attempts": sum(c.attempts for c in calls if not c.reused),
            "prompt_tokens": sum(c.prompt_tokens for c in calls), "prompt_token_counter": self.counter,
            "concurrency": self.concurrency,
            "answers_cut": sum(1 for c in answered if answer_was_cut(c.stats, self.max_new_tokens)),
        }
        for key in SUMMED:
            values = [c.stats[key] for c in answered if isinstance(c.stats.get(key), (int, float))]
            stats[key] = (round(sum(values), 3) if isinstance(sum(values), float) else sum(values)) if values else None
        generated, seconds = stats["generated_tokens"], stats["generation_time"]
        stats["tokens_per_second"] = round(generated / seconds, 2) if generated and seconds else None
        stats["wall_time"] = self.total_time
        for key in ("protocol", "model"):
            stats[key] = next((c.stats.get(key) for c in reversed(answered) if c.stats.get(key)), None)
        stats["servers"] = sorted({str(c.stats["server"]) for c in answered if c.stats.get("server")})
        stats["token_check"] = self.token_check
        return stats

    def expected_tokens(self) -> dict[str, int] | None:
        """What the whole plan sends and asks for, at most: ``prompt`` and ``generated`` tokens (None: one prompt)."""
        if self.single is not None or not self.map_calls:
            return None
        calls = len(self.map_calls) + sum(self.expected_levels or [])
        return {"prompt": sum(c.prompt_tokens for c in self.map_calls) + sum(self.expected_reduce_tokens),
                "generated": calls * (self.max_new_tokens or 0)}

    def plan(self) -> dict[str, Any]:
        """The plan as it was run: which rows fed which map call, every answer, the reduce levels."""
        return {
            "fits_one_prompt": self.fits_one_prompt,
            "rows": self.rows_total,
            "more_rows": self.more_rows,
            "budget_tokens": self.budget if self.single is None else None,
            "token_counter": self.counter,
            "max_new_tokens": self.max_new_tokens,
            "map_calls": len(self.map_calls) if self.single is None else 1,
            "expected_reduce_calls_per_level": self.expected_levels,
            "expected_reduce_prompt_tokens_per_level": self.expected_reduce_tokens,
            "expected_tokens": self.expected_tokens(),
            "concurrency": self.concurrency,
            "checkpoint": self.checkpoint_path,
            "reusable_answers": self.reusable,
            "shortened_rows": self.shortened_rows(),
            "warnings": list(self.warnings),
            "map": [_call_entry(c) for c in self.map_calls],
            "reduce": [{"level": n, "calls": [_call_entry(c) for c in level]}
                       for n, level in enumerate(self.levels, start=1)],
        }


def _call_entry(call: Call) -> dict[str, Any]:
    entry = call.as_dict()
    entry["rows"] = call.last_row - call.first_row + 1
    return entry

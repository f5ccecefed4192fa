"""When to send a generation request again after an error status, and how long to wait first.

Pure decisions, no I/O: the transport asks :meth:`RetryPolicy.wait` after each answer. Failures
before the request left (refused, DNS, connect timeout) are not decided here: urllib3 retries
those on the transport's adapter, for any method, because nothing reached the model.

* 429 and 503 mean the server refused before working: retried up to ``max_attempts`` attempts
  in all, waiting what ``Retry-After`` asks (capped at ``retry_after_max``) or an exponential
  backoff with jitter.
* 502 and 504 come from a gateway and may hide a generation that is still running behind it
  (a retry could queue a duplicate on a one-request-at-a-time PC): one retry at most, after a
  pause of at least ``gateway_retry_pause``.
* Anything else (400, 404, 422, 500 ...) is returned at once: retrying cannot fix it.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping

RETRY_STATUSES = frozenset({429, 502, 503, 504})
GATEWAY_STATUSES = frozenset({502, 504})
BACKOFF_MAX = 8.0


def backoff(attempt: int, base: float = 0.5, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0-based): base, 2x base ... capped at
    8 s, minus up to 25 % jitter (openai-python's schedule)."""
    return min(base * 2**attempt, BACKOFF_MAX) * (1 - 0.25 * rand())


def retry_after(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """Seconds asked by ``retry-after-ms`` / ``Retry-After`` (seconds or HTTP-date), or None."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return None if when is None else max(0.0, when.timestamp() - now())


@dataclass(frozen=True)
class RetryPolicy:
    """The status part of the retry policy (field names follow the settings)."""

    max_attempts: int = 3  # API_MAX_ATTEMPTS: attempts in all for 429/503
    retry_after_max: float = 60.0  # API_RETRY_AFTER_MAX
    backoff_base: float = 0.5
    gateway_retry_pause: float = 3.0

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return backoff(attempt, self.backoff_base, rand)

    def wait(self, status: int, headers: Mapping[str, str], attempt: int, *, attempts: int | None = None,
             gateway_retries: int = 0, statuses: frozenset[int] = RETRY_STATUSES,
             rand: Callable[[], float] = random.random) -> tuple[float, str] | None:
        """``(seconds, why)`` to wait before sending again after ``status`` on attempt ``attempt``
        (1-based), or None to stop and report this answer.

        ``gateway_retries`` counts the retries already spent on 502/504 for this request.
        """
        attempts = self.max_attempts if attempts is None else attempts
        if status not in statuses or attempt >= attempts:
            return None
        asked = retry_after(headers)
        cap = self.retry_after_max
        if status in GATEWAY_STATUSES:
            if gateway_retries >= 1:
                return None
            pause = max(self.gateway_retry_pause, min(asked or 0.0, cap))
            return pause, f"HTTP {status} from a gateway: one retry only, after a pause"
        if asked is None:
            return self.backoff(attempt - 1, rand), "backoff"
        why = f"Retry-After {asked:g}s" + (f", capped at API_RETRY_AFTER_MAX={cap:g}s" if asked > cap else "")
        return min(asked, cap), why

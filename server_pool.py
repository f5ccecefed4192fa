"""Several model servers as one: concurrency limits, dispatch by free capacity, health and failover.

:class:`ModelServerPool` is safe to call from many threads at once. Each server has a limit: the
generations it runs at once (``#slots=N`` after its URL; else what the server reports: 1 for the
pc server, llama.cpp's ``total_slots``; else 1). The pool never has more requests in flight at a
server than its limit.

* **Dispatch.** A request goes to the usable server with the most free slots relative to its
  limit (ties broken at random). When every slot is busy, callers wait here on the laptop, first
  come first served, instead of piling onto one server.
* **Health.** A server is probed with GETs before its first request (protocol, limit). A server
  that refuses connections, times out, answers 503/429, or has no model loaded is taken out for
  a cooldown (growing on each failed probe, up to ``max_cooldown``) and gets work again only
  after a health check with GETs (never a POST) passes. Every change is logged.
* **Failover.** A request that never reached a model (refused connection, 503 while loading,
  model not loaded) goes to another server at once. A request that may already be generating
  (the connection dropped after it was sent, a read timeout, a stream cut after the first byte)
  is not sent again unless the caller asks for it (``retry_ambiguous=True``): it fails with the
  partial answer kept.
* **All down.** With ``wait_for_server=0`` a request fails at once, naming each server and why
  (with one server: that server's own error, as a single client raises it); otherwise it waits
  up to that many seconds for a server to come back.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from typing import Callable, Sequence

import config
from errors import ConfigError, PipelineError
from generation import Generation, HealthReport
from pool_health import (
    AMBIGUOUS,
    FAILOVER,
    ServerStatus,
    failure_kind,
    fresh_error,
    limit_for,
    not_ready_error,
    unavailable_error,
)
from server_client import ServerClient
from server_spec import ServerSpec

logger = logging.getLogger(__name__)

NEW, UP, DOWN = "new", "up", "down"


class _Server:
    """One server's state in the pool; guarded by the pool's lock."""

    def __init__(self, client: ServerClient) -> None:
        self.client = client
        self.spec: ServerSpec = client.spec
        self.limit = client.spec.slots or 1
        self.limit_source = "#slots" if client.spec.slots else "not probed yet"
        self.state = NEW
        self.probing = False
        self.in_flight = 0
        self.served = 0
        self.failed = 0
        self.failures = 0  # failed checks in a row: the cooldown grows with them
        self.error: PipelineError | None = None  # why it is down
        self.retry_at = 0.0  # when a down server may be checked again
        self.checked_at = float("-inf")  # when the last verdict (a failure or a check) was made

    @property
    def display(self) -> str:
        return self.client.display_url


class _Ticket:
    """One caller waiting for a slot. Its event exists only when it has to wait (made and set
    under the pool's lock): a caller served at once costs no Event."""

    def __init__(self, since: float, deadline: float) -> None:
        self.since = since  # when the request started: verdicts older than this are re-checked
        self.deadline = deadline  # until when it may wait for a server to come back
        self.event: threading.Event | None = None
        self.server: _Server | None = None
        self.attempts: int | None = None
        self.error: PipelineError | None = None

    def done(self) -> None:
        """Served or failed: wake the caller if it waits (the pool's lock is held)."""
        if self.event is not None:
            self.event.set()


class ModelServerPool:
    """Several model servers behind one ``generate`` / ``stream``; thread-safe.

    Args:
        settings: the project's settings (timeouts, retries, model name, protocol).
        servers: the servers (:class:`ServerSpec` or URL text with optional ``#slots=...``);
            default ``settings.server_specs()`` (``API_BASE_URL``, or ``PC_IP``/``API_PORT``).
        sleep, clock: passed to each server's transport (tests skip real backoff waits).
        cooldown: seconds a server stays out after it went down before the first re-check;
            doubled after each failed check, up to ``max_cooldown``.
        rand: tie-breaker in [0, 1) between equally free servers.
    """

    def __init__(self, settings: config.Settings, servers: Sequence[ServerSpec | str] | None = None, *,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 cooldown: float = 2.0, max_cooldown: float = 60.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        specs = list(servers) if servers is not None else settings.server_specs()
        self._servers = [_Server(ServerClient(settings, spec, sleep=sleep, clock=clock)) for spec in specs]
        if not self._servers:
            raise ConfigError("No model server given to the pool.",
                              hint="Fix: set API_BASE_URL (or PC_IP) or pass --api-url.")
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._rand = rand
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)  # the timer thread waits on it
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._timer: threading.Thread | None = None
        self._asked = threading.local()  # per thread: the server its latest request went to

    # --- what the pool holds ---

    @property
    def clients(self) -> list[ServerClient]:
        """Each server's client, in configuration order."""
        return [server.client for server in self._servers]

    @property
    def display(self) -> str:
        """The server's URL, or "one of N model servers", for progress messages."""
        if len(self._servers) == 1:
            return self._servers[0].display
        return f"one of {len(self._servers)} model servers"

    def asked(self) -> ServerClient | None:
        """The server the calling thread's latest request went to (None while it waits): after Ctrl-C, who was asked."""
        return getattr(self._asked, "client", None)

    @property
    def capacity(self) -> int:
        """Generations the pool runs at once: the limits of the servers not known to be down."""
        with self._lock:
            return sum(server.limit for server in self._servers if server.state != DOWN)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(server.in_flight for server in self._servers)

    @property
    def waiting(self) -> int:
        """Callers waiting for a free slot."""
        with self._lock:
            return len(self._queue)

    def statuses(self) -> list[ServerStatus]:
        """A snapshot of every server, in configuration order."""
        now = time.monotonic()
        with self._lock:
            return [ServerStatus(
                url=s.display, state="probing" if s.probing else s.state, limit=s.limit,
                limit_source=s.limit_source, in_flight=s.in_flight, served=s.served, failed=s.failed,
                protocol=s.client.protocol, model=s.client.model or s.client.model_name,
                reason=s.error.message if s.state == DOWN and s.error else None,
                retry_in=max(0.0, s.retry_at - now) if s.state == DOWN else None,
            ) for s in self._servers]

    # --- generation ---

    def generate(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, *, json_schema: dict | None = None,
                 retry_ambiguous: bool = False, wait_for_server: float = 0.0) -> Generation:
        """Send one prompt to the freest server and wait for the whole answer.

        ``retry_ambiguous``: also resend a request that may have reached a model (a dropped
        connection, a read timeout) to another server; by default it fails, so that no prompt
        is generated twice behind the user's back. ``wait_for_server``: seconds to wait for a
        server to come back when all are down (0: fail at once). The answer's
        ``stats.server`` names the server. Raises what :meth:`ServerClient.generate` raises;
        when no server is usable, ModelConnectionError naming each server and why.
        """
        def call(client: ServerClient, attempts: int | None) -> Generation:
            return client.generate(prompt, system_prompt, max_new_tokens, temperature, json_schema=json_schema,
                                   attempts=attempts)

        self.clients[0].request(prompt, system_prompt, max_new_tokens, temperature)  # an empty prompt: no slot
        return self._run(call, retry_ambiguous, wait_for_server)

    def stream(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None, *, json_schema: dict | None = None,
               retry_ambiguous: bool = False, wait_for_server: float = 0.0) -> Generation:
        """Like :meth:`generate`, but the Generation yields the answer's pieces as they arrive.

        The server's slot stays taken until the answer has ended or the Generation is closed:
        always close it (``with pool.stream(...) as generation:``). Only a failure before the
        first piece can be sent elsewhere; a stream cut later fails with the partial answer.
        """
        def call(client: ServerClient, attempts: int | None) -> Generation:
            return client.stream(prompt, system_prompt, max_new_tokens, temperature, json_schema=json_schema,
                                 attempts=attempts)

        self.clients[0].request(prompt, system_prompt, max_new_tokens, temperature)  # an empty prompt: no slot
        return self._run(call, retry_ambiguous, wait_for_server)

    def _run(self, call: Callable[[ServerClient, int | None], Generation], retry_ambiguous: bool,
             wait_for_server: float) -> Generation:
        since = time.monotonic()
        deadline = since + max(0.0, wait_for_server)
        last_error: PipelineError | None = None
        self._asked.client = None
        while True:
            try:
                server, attempts = self._acquire(since, deadline, first_in_line=last_error is not None)
            except PipelineError:
                if last_error is None or len(self._servers) > 1 or wait_for_server > 0:
                    raise
                server = None
            if server is None:  # one server, which this request found down: its own error, as a single
                assert last_error is not None  # client raises it (outside the except: the cause stays)
                raise last_error
            self._asked.client = server.client
            try:
                generation = call(server.client, attempts)
            except PipelineError as exc:
                kind = failure_kind(exc)
                self._finish(server, exc)
                if kind == FAILOVER or (kind == AMBIGUOUS and retry_ambiguous):
                    if len(self._servers) > 1:
                        logger.warning("A request failed on %s (%s); trying another server", server.display,
                                       exc.message)
                    last_error = exc
                    continue
                raise
            except BaseException:
                self._finish(server, None, counted=False)  # Ctrl-C: free the slot, no verdict
                raise
            if generation.done:
                self._finish(server, None)
            else:  # a stream: the slot is freed when it ends (an answer closed early counts as neither)
                generation.add_done_callback(lambda error, server=server, generation=generation: self._finish(
                    server, error, counted=error is not None or generation.done))
            return generation

    # --- slots ---

    def _acquire(self, since: float, deadline: float, first_in_line: bool) -> tuple[_Server, int | None]:
        """A slot on a usable server (waiting in line for one), and the send attempts to allow there."""
        ticket = _Ticket(since, deadline)
        with self._lock:
            if first_in_line:  # a request sent elsewhere after a failure keeps its place at the front
                self._queue.appendleft(ticket)
            else:
                self._queue.append(ticket)
            self._service()
            if ticket.server is None and ticket.error is None:
                ticket.event = threading.Event()  # no free slot yet: wait in line
        try:
            if ticket.event is not None:
                ticket.event.wait()
        except BaseException:
            with self._lock:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                elif ticket.server is not None:
                    ticket.server.in_flight -= 1
                    self._service()
            raise
        if ticket.error is not None:
            raise ticket.error
        assert ticket.server is not None
        return ticket.server, ticket.attempts

    def _finish(self, server: _Server, error: BaseException | None, counted: bool = True) -> None:
        """A request on ``server`` ended: free its slot; a failure that says the server is down takes it out."""
        with self._lock:
            server.in_flight -= 1
            if counted and error is None:
                server.served += 1
            elif counted:
                server.failed += 1
                if isinstance(error, PipelineError) and failure_kind(error) in (FAILOVER, AMBIGUOUS):
                    self._set_down(server, error, time.monotonic())
            self._service()

    def _pick(self) -> _Server | None:
        """The usable server with the most free slots relative to its limit (ties at random)."""
        best: list[_Server] = []
        best_free = 0.0
        for server in self._servers:
            if server.state != UP or server.in_flight >= server.limit:
                continue
            free = (server.limit - server.in_flight) / server.limit
            if free > best_free:
                best, best_free = [server], free
            elif free == best_free:
                best.append(server)
        if len(best) > 1:
            return best[int(self._rand() * len(best)) % len(best)]
        return best[0] if best else None

    def _service(self) -> None:
        """With the lock held: start due checks, hand free slots to the waiting callers in order,
        and fail those that can no longer be served."""
        now = time.monotonic()
        if self._queue:
            self._start_due_probes(now)
        while self._queue:
            server = self._pick()
            if server is None:
                break
            ticket = self._queue.popleft()
            server.in_flight += 1
            ticket.server = server
            # Another server that is up (or not checked yet): a refused connection or a 503 goes
            # there at once instead of being retried here with backoff.
            others = any(s.state != DOWN for s in self._servers if s is not server)
            ticket.attempts = 1 if others else None
            ticket.done()
        if self._queue and not any(s.state in (NEW, UP) or s.probing for s in self._servers):
            self._fail_hopeless(now)
        self._schedule(now)

    def _fail_hopeless(self, now: float) -> None:
        """Every server is down: fail the callers whose wait is over and whose servers were all
        checked since they started."""
        for ticket in list(self._queue):
            stale = any(server.checked_at < ticket.since for server in self._servers)
            if now >= ticket.deadline and not stale:
                self._queue.remove(ticket)
                ticket.error = unavailable_error([(s.display, s.error) for s in self._servers],
                                                 waited=ticket.deadline - ticket.since)
                ticket.done()

    # --- health ---

    def _start_due_probes(self, now: float) -> None:
        """Probe new servers, down servers whose cooldown is over, and, when every server is down,
        those whose verdict is older than a waiting request (a request never fails on old news)."""
        all_down = all(server.state == DOWN for server in self._servers)
        newest = max(ticket.since for ticket in self._queue) if all_down else 0.0
        for server in self._servers:
            if server.probing or server.state == UP:
                continue
            if server.state == NEW or now >= server.retry_at or (all_down and server.checked_at < newest):
                server.probing = True
                threading.Thread(target=self._probe, args=(server, server.state == NEW), daemon=True,
                                 name=f"probe {server.display}").start()

    def _probe(self, server: _Server, first: bool) -> None:
        """Check one server with GETs (in its own thread) and record the verdict."""
        error: PipelineError | None = None
        limit: tuple[int, str] | None = None
        try:
            if first:  # its first request would detect the protocol anyway: no separate health gate
                server.client.detect()
            else:
                server.client.forget()  # it may have come back as another server: detect it again
                attempts = self.settings.api_max_attempts if len(self._servers) == 1 else 1
                report = server.client.probe(attempts)
                if not report.ok:
                    error = not_ready_error(report, server.display)
            if error is None:
                limit = limit_for(server.client)
        except PipelineError as exc:
            error = exc
        except Exception as exc:  # a bug must not leave the server "probing" forever
            logger.exception("Unexpected error while checking %s", server.display)
            error = fresh_error(PipelineError(f"Unexpected error while checking {server.display}: {exc!r}"))
        with self._lock:
            server.probing = False
            now = time.monotonic()
            if error is None and limit is not None:
                self._set_up(server, limit, now, back=not first)
            else:
                assert error is not None
                self._set_down(server, error, now, checked=True)
            self._service()

    def _set_up(self, server: _Server, limit: tuple[int, str], now: float, back: bool) -> None:
        changed = server.state != UP or (server.limit, server.limit_source) != limit
        server.limit, server.limit_source = limit
        server.state, server.error, server.failures, server.checked_at = UP, None, 0, now
        if changed:
            log = logger.warning if back else logger.info
            log("Model server %s is %s: %s, %d at a time (%s)", server.display, "back" if back else "ready",
                server.client.protocol or "?", server.limit, server.limit_source)

    def _set_down(self, server: _Server, error: PipelineError, now: float, checked: bool = False,
                  quiet: bool = False) -> None:
        """Take a server out (or keep it out after a failed check) until its cooldown is over.

        ``quiet``: the caller reported the reason already (a health check): the change goes to
        the log at INFO level only."""
        server.error, server.checked_at = error, now
        if server.state == DOWN and not checked:
            return  # another request on it failed too: one verdict is enough
        server.failures += 1
        delay = min(self.max_cooldown, self.cooldown * 2 ** (server.failures - 1))
        server.retry_at = now + delay
        if server.state == DOWN:
            logger.info("Model server %s is still down: %s; next check in %.3g s", server.display,
                        error.message.rstrip("."), delay)
        else:
            # With one server the caller reports the same failure: on the console it would say it twice.
            shown = not quiet and len(self._servers) > 1
            (logger.warning if shown else logger.info)(
                "Model server %s is down: %s. It gets no work until a health check passes; next check in %.3g s",
                server.display, error.message.rstrip("."), delay)
        server.state = DOWN

    def check_health(self) -> list[HealthReport]:
        """Check every server now (GETs only, in parallel) and return one report per server.

        A ready server is put to work (``report.concurrency`` is its limit); one that is not and
        has nothing in flight is taken out. Never raises; logs each server's state.
        """
        reports: list[HealthReport | None] = [None] * len(self._servers)

        def check(index: int, server: _Server) -> None:
            report = server.client.check_health()
            if report.ok:
                try:
                    report.concurrency, report.concurrency_source = limit_for(server.client)
                except PipelineError as exc:
                    report.ok, report.detail, report.fix = False, exc.message, exc.hint
            reports[index] = report
            with self._lock:
                now = time.monotonic()
                if report.ok:
                    self._set_up(server, (report.concurrency or 1, report.concurrency_source or ""), now,
                                 back=server.state == DOWN)
                elif server.in_flight == 0:  # a busy server may not answer a GET: not a verdict
                    self._set_down(server, not_ready_error(report, server.display), now, checked=True, quiet=True)
                self._service()

        threads = [threading.Thread(target=check, args=(i, s), daemon=True) for i, s in enumerate(self._servers)]
        for thread in threads[1:]:
            thread.start()
        check(0, self._servers[0])
        for thread in threads[1:]:
            thread.join()
        return [report for report in reports if report is not None]

    # --- the timer: re-checks and deadlines while callers wait ---

    def _schedule(self, now: float) -> None:
        """With the lock held: make sure the timer wakes for the next cooldown end or deadline."""
        if self._timer is not None:
            self._wakeup.notify()
        elif self._next_wake(now) is not None:
            self._timer = threading.Thread(target=self._timer_loop, daemon=True, name="model server pool timer")
            self._timer.start()

    def _next_wake(self, now: float) -> float | None:
        if not self._queue:
            return None
        times = [s.retry_at for s in self._servers if s.state == DOWN and not s.probing]
        if not any(s.state in (NEW, UP) or s.probing for s in self._servers):
            times += [t.deadline for t in self._queue if t.deadline > now]
        return min(times) if times else None

    def _timer_loop(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                wake = self._next_wake(now)
                if wake is None:
                    self._timer = None
                    return
                if wake > now:
                    self._wakeup.wait(wake - now)  # state changes notify: the next wake is computed anew
                else:
                    self._service()
                    self._wakeup.wait(0.01)  # never spin, whatever the state

    # --- lifetime ---

    def close(self) -> None:
        """Close every server's HTTP sessions; the pool reconnects if used again."""
        for server in self._servers:
            server.client.close()

    def __enter__(self) -> ModelServerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ModelServerPool {len(self._servers)} servers, capacity {self.capacity}>"

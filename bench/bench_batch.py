"""Benchmark: --per-row throughput against a server's capacity, a shell loop, and the laptop's own cost.

    python bench/bench_batch.py [--db-url postgresql://postgres@127.0.0.1:5432/postgres]
                                [--rows 5000] [--loop-sample 30] [--cpu-rows 20000]
                                [--memory-rows 20000 200000]

A lean loopback server in its own process speaks the llama.cpp flavour of the OpenAI API and
reports 8 slots (``GET /props``), so the command's default concurrency is 8; it runs at most 8
generations at once and takes a fixed time per generation. Rows come from ``generate_series``
(nothing is created in the database). Every run is the real command in its own process
(``python db_to_model_pipeline.py --per-row ... --output FILE.jsonl``), timed from start to
exit, interpreter start and the database read included.

1. Throughput: 5,000 rows at 50 ms per generation and 8 slots (capacity 160 rows/s).
   Target: at least 0.9 x capacity.
2. The shell loop users write today: the command once per row (``for id in ...; do python
   db_to_model_pipeline.py --query "... WHERE id = $id"; done``) against the same server; a
   sample of ``--loop-sample`` rows is timed and extrapolated to all rows. Target: the per-row
   mode at least 20 x faster.
3. The laptop's cost: process CPU time (user + system, from ``os.wait4``) per row against the
   same server answering at once. Target: at most 1 ms per row.
4. Memory: peak RSS of the process (``ru_maxrss`` from ``os.wait4``) for 200,000 rows against
   20,000. Target: at most 1.2 x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO_ROOT / "db_to_model_pipeline.py")
SETTINGS = ("API_", "DB_", "DATABASE_URL", "RESULTS_DATABASE_URL", "PC_IP", "MODEL_", "MAX_NEW_TOKENS",
            "TEMPERATURE", "LOG_", "ENV_FILE")
TEMPLATE = "Classify the sentiment of this review as positive, neutral or negative: {row.body}"


def query(first: int, last: int) -> str:
    return (f"SELECT g AS id, '리뷰 ' || g || ': 배송이 빨라요, and the quality is fine for the price.' AS body "
            f"FROM generate_series({first}, {last}) AS g")


# --- the lean loopback server ---------------------------------------------------------------


class LeanServer:
    """llama.cpp-like: /health, /v1/models, /props (total_slots), /v1/chat/completions; /stats.

    A thread per keep-alive connection reading HTTP/1.1 by hand (a few lines of parsing instead
    of the standard library's header parser, so the server's own CPU time stays far below the
    client's), at most ``slots`` generations at once, each taking ``delay`` seconds measured with
    ``time.sleep`` (an event loop's timers round up to the next millisecond and release answers
    in bursts).
    """

    def __init__(self, slots: int, delay: float) -> None:
        self.slots, self.delay = slots, delay
        self.gate = threading.Semaphore(slots)
        self.lock = threading.Lock()
        self.requests = self.in_progress = self.peak = 0
        self.service = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.connection, args=(conn,), daemon=True).start()

    def connection(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline()
                if not line:
                    return
                method, path, _ = line.split(b" ", 2)
                length = 0
                while True:
                    header = reader.readline()
                    if header in (b"\r\n", b"\n", b""):
                        break
                    if header[:15].lower() == b"content-length:":
                        length = int(header[15:])
                body = reader.read(length) if length else b""
                status, payload = self.route(method.decode(), path.decode(), body)
                data = json.dumps(payload).encode()
                conn.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, b"OK" if status == 200 else b"Not Found", len(data), data))
        except OSError:
            return
        finally:
            conn.close()

    def route(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if method == "POST" and path == "/v1/chat/completions":
            return 200, self.generate(json.loads(body))
        answers = {
            "/health": {"status": "ok"},
            "/v1/models": {"object": "list", "data": [{"id": "phi4", "object": "model", "owned_by": "llamacpp"}]},
            "/props": {"total_slots": self.slots},
            "/stats": {"requests": self.requests, "peak": self.peak,
                       "mean_service": self.service / self.requests if self.requests else 0.0},
        }
        payload = answers.get(path) if method == "GET" else None
        return (200, payload) if payload is not None else (404, {"error": {"code": 404, "message": "Not Found"}})

    def generate(self, body: dict) -> dict:
        with self.gate:
            started = time.perf_counter()
            with self.lock:
                self.in_progress += 1
                self.peak = max(self.peak, self.in_progress)
            if self.delay:
                time.sleep(self.delay)
            with self.lock:
                self.in_progress -= 1
                self.requests += 1
                self.service += time.perf_counter() - started
        tokens = len(body["messages"][-1]["content"].split()) + 6
        return {"id": "chatcmpl-lean", "object": "chat.completion", "model": "phi4",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1}}


def serve(slots: int, delay: float) -> None:
    server = LeanServer(slots, delay)
    print(server.url, flush=True)
    server.serve_forever()


class ServerProcess:
    def __init__(self, slots: int, delay: float) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--slots", str(slots), "--delay", str(delay)],
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url + "/stats") as reply:
            return json.load(reply)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.proc.terminate()
        self.proc.wait()


# --- runs -------------------------------------------------------------------------------------


def environment(db_url: str, server_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS)}
    env.update(DATABASE_URL=db_url, API_BASE_URL=server_url, LOG_FILE="", MAX_NEW_TOKENS="16")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's laptop: compiled modules are cached
    return env


def timed_process(command: list[str], env: dict[str, str], cwd: str) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS in KiB, exit code) of one process run to its end."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... exited {proc.returncode}:\n{stderr}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, proc.returncode


def per_row(rows: int, env: dict[str, str], workdir: str) -> tuple[float, float, int]:
    output = Path(workdir) / f"out-{rows}-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, SCRIPT, "--per-row", "--query", query(1, rows), "--template", TEMPLATE,
               "--output", str(output), "--quiet"]
    wall, cpu, rss, _ = timed_process(command, env, workdir)
    lines = sum(1 for _ in open(output, encoding="utf-8")) - 1
    assert lines == rows, f"{lines} rows recorded of {rows}"
    output.unlink()
    return wall, cpu, rss


def shell_loop(sample: int, env: dict[str, str], workdir: str) -> float:
    """Seconds for a shell loop running the command once per row, ``sample`` rows."""
    loop = (f'for id in $(seq 1 {sample}); do "{sys.executable}" "{SCRIPT}" --quiet --no-stream '
            f'--query "{query(1, 1).replace("(1, 1)", "($id, $id)")}" '
            f'--template "Classify the sentiment of this review as positive, neutral or negative: {{data}}" '
            '> /dev/null || exit 1; done')
    wall, _, _, _ = timed_process(["bash", "-c", loop], env, workdir)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db-url", default=os.environ.get("TEST_DATABASE_URL")
                        or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--loop-sample", type=int, default=30)
    parser.add_argument("--cpu-rows", type=int, default=20000)
    parser.add_argument("--memory-rows", type=int, nargs=2, default=[20000, 200000])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=0.05, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.slots, args.delay)
        return
    with tempfile.TemporaryDirectory() as workdir:
        measure(args, workdir)


def measure(args: argparse.Namespace, workdir: str) -> None:
    capacity = 8 / 0.05
    with ServerProcess(8, 0.05) as server:
        env = environment(args.db_url, server.url)
        wall, cpu, _ = per_row(args.rows, env, workdir)
        served = server.stats()
        loop_wall = shell_loop(args.loop_sample, env, workdir)
    rate = args.rows / wall
    loop_total = loop_wall / args.loop_sample * args.rows
    peak, service = served["peak"], served["mean_service"]
    print(f"per-row throughput, {args.rows:,} rows, server: 8 slots x 50 ms (capacity {capacity:.0f} rows/s)")
    print(f"  --per-row (whole process)        {wall:8.2f} s   {rate:7.1f} rows/s   "
          f"ratio to capacity {rate / capacity:.2f} (target >= 0.9)")
    print(f"  the server: at most {peak} generations at once, {service * 1000:.1f} ms each on average "
          f"(measured capacity {8 / service:.0f} rows/s; ratio to it {rate / (8 / service):.2f})")
    print(f"  shell loop, {args.loop_sample} rows timed         {loop_wall:8.2f} s   "
          f"{loop_wall / args.loop_sample * 1000:7.0f} ms per row")
    print(f"  shell loop, extrapolated to {args.rows:,}  {loop_total:8.0f} s   "
          f"--per-row is {loop_total / wall:.0f}x faster (target >= 20)")
    with ServerProcess(8, 0.0) as server:
        env = environment(args.db_url, server.url)
        one_wall, one_cpu, _ = per_row(1, env, workdir)
        cpu_wall, cpu_total, _ = per_row(args.cpu_rows, env, workdir)
        small, large = args.memory_rows
        _, _, rss_small = per_row(small, env, workdir)
        _, _, rss_large = per_row(large, env, workdir)
    print(f"the laptop's own cost, server answering at once ({args.cpu_rows:,} rows, {cpu_wall:.1f} s)")
    print(f"  CPU per row, whole process       {cpu_total / args.cpu_rows * 1000:8.3f} ms   (target <= 1 ms)")
    print(f"  CPU per row beyond a 1-row run   {(cpu_total - one_cpu) / (args.cpu_rows - 1) * 1000:8.3f} ms   "
          f"(a 1-row run: {one_cpu:.2f} s CPU, {one_wall:.2f} s)")
    print(f"  peak RSS, {small:,} rows             {rss_small / 1024:8.1f} MB")
    print(f"  peak RSS, {large:,} rows            {rss_large / 1024:8.1f} MB   ratio {rss_large / rss_small:.2f} "
          f"(target <= 1.2)")


if __name__ == "__main__":
    main()

"""Map prompts packed ahead of the calls, so the size of the plan is known early and memory stays flat.

Packing is fast next to the model (20,000 rows in 1-2 s, against minutes of calls), but the
calls take prompts one at a time. Packed only as the calls asked for them, the number of map
calls was known just before the last one, so the progress showed no total and no ETA, and a
stopped run could not say how many calls were left. :class:`PackAhead` packs every chunk at
once in a thread, writes each prompt to a private temporary file (prompts are never all in
memory) and queues where it is; the calls read them back in order. When the last chunk is
packed, ``on_planned(calls)`` is called from that thread.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from typing import Any, Callable, Iterator

from mr_calls import Call

logger = logging.getLogger(__name__)

_DONE = object()


class PackAhead:
    """Iterate ``(call, prompt)`` pairs of ``chunks``, packed in a thread ahead of the reader.

    ``chunks`` is consumed in the thread only. Iterating raises whatever packing raised (a
    PromptError for a row that cannot fit), after the chunks packed before it. Use as a context
    manager: leaving it stops packing and removes the file.
    """

    def __init__(self, chunks: Iterator[tuple[Call, str]], on_planned: Callable[[int], None], *,
                 directory: str | None = None) -> None:
        self._chunks = chunks
        self._on_planned = on_planned
        self._file = tempfile.TemporaryFile(prefix="prompts-", suffix=".spool", dir=directory)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pack, name="pack-map-prompts", daemon=True)
        self._thread.start()

    def _pack(self) -> None:
        offset = count = 0
        try:
            for call, prompt in self._chunks:
                if self._stop.is_set():
                    return
                data = prompt.encode("utf-8", "surrogatepass")
                with self._lock:  # one file position for both threads (os.pread is not on Windows)
                    self._file.seek(offset)
                    self._file.write(data)
                    self._file.flush()
                self._queue.put((call, offset, len(data)))
                offset += len(data)
                count += 1
            self._on_planned(count)
            self._queue.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - the reader raises it, in order
            if not self._stop.is_set():
                self._queue.put(exc)

    def __iter__(self) -> Iterator[tuple[Call, str]]:
        while True:
            try:
                item = self._queue.get(timeout=0.2)  # short waits: Ctrl-C is seen at once
            except queue.Empty:
                continue
            if item is _DONE:
                self._queue.put(_DONE)  # a second iteration (or wait) ends at once too
                return
            if isinstance(item, BaseException):
                raise item
            call, offset, size = item
            with self._lock:
                self._file.seek(offset)
                data = self._file.read(size)
            yield call, data.decode("utf-8", "surrogatepass")

    def wait(self) -> None:
        """Until every chunk is packed (the plan complete), or packing failed."""
        self._thread.join()

    def close(self) -> None:
        """Stop packing and remove the file."""
        self._stop.set()
        self._thread.join(timeout=5)  # a chunk takes milliseconds to pack
        self._file.close()

    def __enter__(self) -> PackAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

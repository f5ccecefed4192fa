"""A query's rows, read once into a private temporary file, for work that takes hours over them.

Per-row runs and map-reduce call the model for minutes or hours. Holding a server-side cursor
open for that long would keep one transaction (and its snapshot) open the whole time, which
blocks PostgreSQL's vacuum and dies with the connection. Instead the rows are read at once,
through the same read-only, guarded, time-bounded query as everywhere else, into a spool file
next to nothing else (a ``TemporaryFile``, removed when closed), and the transaction ends
before the first model call. Memory stays flat: one row at a time is held while reading and
while iterating.

The file holds length-prefixed pickles of row tuples that this process wrote itself; it is
never read from anywhere else.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import struct
import tempfile
import time
from typing import IO, Any, Callable, Iterator

from db_connector import Database, Params

logger = logging.getLogger(__name__)

#: How often (in rows) the reader reports progress while spooling.
PROGRESS_EVERY = 10_000

# Each row is one length-prefixed pickle of its values: reading back holds one row at a time.
_LENGTH = struct.Struct("<I")
_PROTOCOL = pickle.HIGHEST_PROTOCOL


class RowSpool:
    """The rows of one query, on disk: iterate as often as needed; ``close()`` removes the file.

    Attributes:
        columns: the column names, in the query's order.
        count: how many rows were read.
        has_more: True when ``max_rows`` cut the result (the query had more rows).
        read_time: seconds the database read took (the transaction was open that long).
    """

    def __init__(self, columns: list[str], file: IO[bytes], count: int, has_more: bool, read_time: float) -> None:
        self.columns = columns
        self.count = count
        self.has_more = has_more
        self.read_time = read_time
        self._file: IO[bytes] | None = file

    @classmethod
    def read(cls, database: Database, query: str, params: Params = None, *, max_rows: int | None = None,
             directory: str | None = None, on_progress: Callable[[int], None] | None = None) -> RowSpool:
        """Run ``query`` (read-only, guarded) and copy its rows to a temporary file.

        Args:
            database: where to run it.
            query, params: as for :meth:`db_connector.Database.stream_rows`.
            max_rows: read at most this many rows (None: all of them).
            directory: where the temporary file goes (default: the system's temp folder).
            on_progress: called with the rows read so far, every ``PROGRESS_EVERY`` rows.

        Raises:
            ReadOnlyViolation, QueryError, DBConnectionError (the spool file is removed).
        """
        started = time.perf_counter()
        spool_file = tempfile.TemporaryFile(prefix="rows-", suffix=".spool", dir=directory)
        try:
            with database.stream_rows(query, params, max_rows=max_rows) as stream:
                columns = list(stream.columns)
                count = 0
                for row in stream:
                    record = pickle.dumps(tuple(_storable(value) for value in row.values()), _PROTOCOL)
                    spool_file.write(_LENGTH.pack(len(record)))
                    spool_file.write(record)
                    count += 1
                    if on_progress and count % PROGRESS_EVERY == 0:
                        on_progress(count)
                if max_rows is not None and not stream.has_more:
                    stream.count_remaining()  # looks one row past the cap: were there more?
                has_more = stream.has_more
        except BaseException:
            spool_file.close()
            raise
        spool_file.flush()
        elapsed = time.perf_counter() - started
        logger.info("Read %d row(s)%s into a spool file in %.2f s", count,
                    " (more rows were left out by the row cap)" if has_more else "", elapsed)
        return cls(columns, spool_file, count, has_more, elapsed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Each row as a dict (keys in ``columns`` order), read back from the file."""
        if self._file is None:
            raise ValueError("the row spool is closed")
        spool_file = self._file
        spool_file.seek(0)
        columns = self.columns
        for _ in range(self.count):
            (size,) = _LENGTH.unpack(spool_file.read(_LENGTH.size))
            yield dict(zip(columns, pickle.loads(spool_file.read(size))))

    def close(self) -> None:
        """Remove the spool file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RowSpool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _storable(value: Any) -> Any:
    """bytea comes back as a memoryview, which cannot be pickled: keep its bytes."""
    return bytes(value) if isinstance(value, memoryview) else value


def row_fingerprint(values: tuple[Any, ...]) -> str:
    """A stable hash of a row's values (for rows without a key column): same values, same hash.

    Values are hashed through their ``repr``, which is stable across runs for the types
    psycopg2 returns (numbers, text, Decimal, dates and times, UUID, dict/list from JSON).
    """
    digest = hashlib.sha256()
    for value in values:
        digest.update(repr(_storable(value)).encode("utf-8", "surrogatepass"))
        digest.update(b"\x1f")
    return digest.hexdigest()[:16]

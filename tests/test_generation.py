"""generation: typed stats and the Generation object, without a network (a stream is a generator)."""

from __future__ import annotations

from typing import Iterator

import pytest

from errors import BadResponseError, ModelTimeoutError
from generation import STATS_KEYS, Generation, GenerationStats, StreamProgress


def test_stats_dict_has_the_public_keys_in_order():
    stats = GenerationStats(protocol="pc", model="phi4-quantized", server="http://pc:8000", wall_time=1.5)
    assert tuple(stats.as_dict()) == STATS_KEYS
    assert stats.as_dict()["server"] == "http://pc:8000" and stats.as_dict()["input_tokens"] is None


def test_a_complete_generation_yields_its_text_once():
    generation = Generation.complete("답변", GenerationStats(protocol="pc"))
    assert generation.done and not generation.is_streamed
    assert list(generation) == ["답변"] and list(generation) == []
    assert generation.text == "답변" == generation.partial_text
    assert list(Generation.complete("", GenerationStats())) == []


class Stream:
    """A stream of pieces that records whether it was closed and can fail at the end."""

    def __init__(self, pieces: list[str], error: Exception | None = None) -> None:
        self.pieces, self.error = pieces, error
        self.closed_http = 0
        self.finished = False

    def events(self) -> Iterator[str]:
        try:
            yield from self.pieces
            if self.error:
                raise self.error
        finally:
            self.finished = True

    def close(self) -> None:
        self.closed_http += 1


def streamed(stream: Stream, **kwargs) -> Generation:
    stats = GenerationStats(protocol="openai")
    ticks = iter(range(100))
    return Generation.streamed(stream.events(), StreamProgress(stats), close=stream.close, started=0.0,
                               clock=lambda: float(next(ticks)), url="http://pc:8080", **kwargs)


def test_a_stream_yields_pieces_then_sets_wall_time_and_releases_the_connection():
    stream = Stream(["가", "나", "다"])
    generation = streamed(stream)
    assert not generation.done and generation.stats.wall_time is None
    assert list(generation) == ["가", "나", "다"]
    # The ticking clock is read at the first piece (0) and at the end (1).
    assert generation.done and generation.text == "가나다" and generation.stats.wall_time == 1.0
    assert stream.closed_http == 1
    generation.close()
    assert stream.closed_http == 1  # idempotent


def test_text_reads_the_rest_and_close_stops_early():
    assert streamed(Stream(["a", "b"])).text == "ab"
    stream = Stream(["a", "b", "c"])
    generation = streamed(stream)
    assert next(iter(generation)) == "a"
    generation.close()
    assert stream.finished and stream.closed_http == 1
    assert generation.text == "a" and not generation.done and list(generation) == []


def test_an_error_mid_stream_propagates_and_releases_the_connection():
    stream = Stream(["a"], ModelTimeoutError("silence", partial_text="a"))
    generation = streamed(stream)
    with pytest.raises(ModelTimeoutError):
        list(generation)
    assert stream.closed_http == 1 and generation.partial_text == "a" and not generation.done


def test_a_stream_over_the_size_cap_fails_with_the_partial_answer():
    stream = Stream(["가나다"] * 10)  # 9 bytes a piece
    generation = streamed(stream, max_bytes=20)
    with pytest.raises(BadResponseError) as info:
        list(generation)
    assert "API_MAX_RESPONSE_BYTES=20" in str(info.value)
    assert info.value.partial_text == "가나다" * 3 and info.value.stats is generation.stats
    assert stream.closed_http == 1

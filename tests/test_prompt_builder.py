"""Tests for prompt_builder: templates, value rendering, formats, the size budget."""

from __future__ import annotations

import datetime
import functools
import json
import logging
import re
import uuid
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prompt_builder as pb
import token_count
import value_format
from token_count import ESTIMATE
from errors import PipelineError, PromptError

KST = datetime.timezone(datetime.timedelta(hours=9))
UTC = datetime.timezone.utc
BIG = 10**9  # a token budget nothing here reaches

ROWS = [{"id": 1, "name": "홍길동", "memo": None}, {"id": 2, "name": "a|b", "memo": ""}]
DB_DATA = {"query": "SELECT id, name, memo FROM t", "results": ROWS, "row_count": 2}
TABLE = "| id | name | memo |\n|---|---|---|\n| 1 | 홍길동 | NULL |\n| 2 | a\\|b | \"\" |"


def prompt(template: str | None, context: str | None = None, **kwargs) -> pb.PromptResult:
    kwargs.setdefault("max_tokens", BIG)
    return pb.build_prompt(DB_DATA, template, context, **kwargs)


# ---------------------------------------------------------------------------
# Templates and placeholders
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, context, expected",
    [
        ("{data}", None, TABLE),
        ("다음 데이터를 분석해주세요: {data}", None, "다음 데이터를 분석해주세요:\n" + TABLE),
        ("{data}\n행 수: {row_count}", None, TABLE + "\n행 수: 2"),
        ("{data}\ncolumns={columns}", None, TABLE + "\ncolumns=id, name, memo"),
        ("Q: {query}\n{data}", None, "Q: SELECT id, name, memo FROM t\n" + TABLE),
        ("{context}\n{data}", "매출 위주로", "매출 위주로\n" + TABLE),
        ("{context}|{data}", None, "|\n" + TABLE),  # no context: {context} is empty
        ("{{data}} {{context}} {{dta}}\n{data}", None, "{data} {context} {dta}\n" + TABLE),
        (
            '출력 형식: {"summary": "...", "detail": {"score": 0}}\n{data}',
            None,
            '출력 형식: {"summary": "...", "detail": {"score": 0}}\n' + TABLE,
        ),
        ("{ } {} {1} {a-b} {{ }} }} {{\"a\": 1}} {data\n{data}", None, "{ } {} {1} {a-b} {{ }} }} {{\"a\": 1}} {data\n" + TABLE),
        ("code: if (x) { return {y: 1}; }\n{data}", None, "code: if (x) { return {y: 1}; }\n" + TABLE),
        ("{데이터}\n{data}", None, "{데이터}\n" + TABLE),  # not an ASCII name: left alone
        ("{data}\n{data}", None, TABLE + "\n" + TABLE),
    ],
)
def test_placeholders_are_substituted_and_other_braces_kept(template, context, expected):
    result = prompt(template, context)
    assert result.text == expected
    assert result.warnings == ()


def test_substituted_values_are_never_rescanned():
    rows = [{"v": "{query} {data} {{data}} {dta}"}]
    result = pb.build_prompt(
        {"query": "SELECT '{data}'", "results": rows}, "{query}|{context}|{data}", "{row_count}", max_tokens=BIG
    )
    assert result.text == "SELECT '{data}'|{row_count}|\n| v |\n|---|\n| {query} {data} {{data}} {dta} |"


@pytest.mark.parametrize(
    "template, named, suggestion",
    [
        ("{dta}", "{dta}", "did you mean {data}?"),
        ("분석: {Data}", "{Data}", "did you mean {data}?"),
        ("{contxt} {data}", "{contxt}", "did you mean {context}?"),
        ("{row_cnt}", "{row_cnt}", "did you mean {row_count}?"),
        ("{data} {name}", "{name}", None),
        ('f"{user_id}" {data}', "{user_id}", None),
    ],
)
def test_unknown_placeholder_is_an_error_naming_it(template, named, suggestion):
    with pytest.raises(PromptError) as info:
        prompt(template)
    assert named in info.value.message
    if suggestion:
        assert suggestion in info.value.message
    for name in pb.PLACEHOLDERS:
        assert "{" + name + "}" in info.value.hint
    assert "{{" + named.strip("{}") + "}}" in info.value.hint  # how to write it literally


def test_all_unknown_placeholders_are_reported_at_once():
    with pytest.raises(PromptError) as info:
        pb.check_template("{dta} {contxt} {dta} {foo}")
    assert "{dta} (did you mean {data}?), {contxt} (did you mean {context}?), {foo}" in info.value.message


def test_check_template_lists_used_placeholders():
    assert pb.check_template("{query} {data} {query} {{row_count}} {\"a\": 1}") == ("query", "data")


def test_template_without_data_gets_it_appended_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="prompt_builder"):
        result = prompt("이 결과를 요약해주세요.")
    assert result.text == "이 결과를 요약해주세요.\n\nData:\n" + TABLE
    assert len(result.warnings) == 1 and "{data}" in result.warnings[0]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == list(result.warnings)


def test_context_without_placeholder_gets_its_own_section():
    result = prompt("요약: {data}", "2024년 데이터입니다")
    assert result.text == "요약:\n" + TABLE + "\n\nAdditional context:\n2024년 데이터입니다"
    assert result.warnings == ()


def test_template_without_data_or_context_gets_both_sections():
    result = prompt("요약해주세요.", "메모")
    assert result.text == "요약해주세요.\n\nData:\n" + TABLE + "\n\nAdditional context:\n메모"


def test_default_template_shows_query_data_context_and_asks_for_analysis():
    result = prompt(None, "월별 추세에 집중")
    assert result.text == (
        "Analyze the following database query results.\n\n"
        "Query:\nSELECT id, name, memo FROM t\n\n"
        "Data (Markdown table):\n" + TABLE + "\n\n"
        "Additional context:\n월별 추세에 집중\n\n"
        "Summarize the key patterns, notable values and anything unusual. Base every statement on the data shown."
    )


def test_default_template_leaves_out_missing_query_and_context():
    text = pb.build_prompt_from_data(ROWS, data_format="csv")
    assert "Query:" not in text and "Additional context" not in text
    assert "Data (CSV with a header row; an unquoted NULL is SQL NULL):\nid,name,memo\n" in text


def test_build_prompt_from_data_returns_the_text():
    assert pb.build_prompt_from_data(DB_DATA, "{data}", max_tokens=BIG) == TABLE
    assert pb.build_prompt_from_data(DB_DATA, "다음 데이터를 분석해주세요: {data}").startswith(
        "다음 데이터를 분석해주세요:\n| id |"
    )


def test_templates_load_from_utf8_files(tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "summary.txt").write_text("﻿요약해주세요 😀\r\n{data}\r\n", encoding="utf-8")  # BOM, CRLF
    assert pb.load_template(folder / "summary.txt") == "요약해주세요 😀\n{data}\n"
    result = pb.build_prompt(DB_DATA, folder / "summary.txt", max_tokens=BIG)
    assert result.text == "요약해주세요 😀\n" + TABLE + "\n"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "Template file not found: {path}"),
        (lambda d: d, "Template path is a folder, not a file: {path}"),
        (lambda d: _write(d / "latin1.txt", "caf\xe9 {data}".encode("latin-1")), "not valid UTF-8: {path} (byte 3)"),
        (lambda d: _write(d / "typo.txt", b"{dta}"), "{path}: Unknown placeholder in the template: {dta}"),
    ],
)
def test_template_file_errors_name_the_path(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(PromptError) as info:
        pb.load_template(str(path))
    assert message.replace("{path}", str(path)) in info.value.message


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: pb.build_prompt("SELECT 1"), "must be a list of row dicts, not str"),
        (lambda: pb.build_prompt(None), "must be a list of row dicts, not NoneType"),
        (lambda: pb.build_prompt({"query": "SELECT 1"}), "db_data has no 'results' key"),
        (lambda: pb.build_prompt({"results": None}), "list of row dicts, not NoneType"),
        (lambda: pb.build_prompt({"results": {"a": 1}}), "list of row dicts, not dict"),
        (lambda: pb.build_prompt([(1, 2)]), "Row 1 is a tuple, not a mapping"),
        (lambda: pb.build_prompt([{"a": 1}, {"b": 2}]), "Row 2 has no column 'a'"),
        (lambda: pb.build_prompt([{"a": 1}, {"a": 1, "b": 2}]), "Row 2 has columns that row 1 does not: b"),
        (lambda: pb.build_prompt({"results": [], "query": 5}), "db_data['query'] must be text"),
        (lambda: pb.build_prompt({"results": [], "row_count": -1}), "row_count'] must be a non-negative integer"),
        (lambda: pb.build_prompt({"results": [], "row_count": "3"}), "row_count'] must be a non-negative integer"),
        (lambda: pb.build_prompt({"results": [], "more_rows": "yes"}), "more_rows'] must be True or False"),
        (lambda: pb.build_prompt({"results": [], "columns": "a,b"}), "columns'] must be a list of column names"),
        (lambda: pb.build_prompt(ROWS, data_format="xml"), "Unknown data format 'xml'"),
        (lambda: pb.build_prompt(ROWS, max_tokens=0), "max_tokens must be an integer >= 1"),
        (lambda: pb.build_prompt(ROWS, max_tokens=True), "max_tokens must be an integer >= 1"),
        (lambda: pb.build_prompt(ROWS, max_chars=1.5), "max_chars must be an integer >= 1"),
        (lambda: pb.build_prompt(ROWS, max_rows=-1), "max_rows must be an integer >= 0"),
        (lambda: pb.build_prompt(ROWS, max_cell_chars=0), "max_cell_chars must be an integer >= 1"),
        (lambda: pb.build_prompt(ROWS, 42), "A template must be text or a path, not int"),
        (lambda: pb.build_prompt(ROWS, "{data}", ["ctx"]), "additional_context must be text, not list"),
        (lambda: pb.build_prompt(ROWS, system_prompt=1), "system_prompt must be text"),
        (lambda: pb.build_prompt(ROWS, max_new_tokens=16384), "No room for a prompt"),
        (lambda: pb.build_prompt(ROWS, system_prompt="시스템 " * 9000), "The system prompt alone needs about"),
        (lambda: pb.format_db_results(ROWS, "yaml"), "Unknown data format 'yaml'"),
        (lambda: pb.format_value(1, fmt="html"), "Unknown data format 'html'"),
        (lambda: pb.default_token_budget(100, 50, -1), "reserve must be a non-negative integer"),
    ],
)
def test_bad_input_raises_prompt_error(call, fragment):
    with pytest.raises(PromptError) as info:
        call()
    assert fragment in str(info.value)
    assert isinstance(info.value, PipelineError) and info.value.code == "PROMPT_ERROR"


def test_unknown_format_error_lists_the_formats():
    with pytest.raises(PromptError) as info:
        pb.build_prompt(ROWS, data_format="xml")
    assert info.value.hint == "Use one of: markdown, json, csv, records."


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


class Custom:
    def __str__(self) -> str:
        return "custom|thing"


class Text(str):
    pass


NESTED = {"a": [1, None, Decimal("2.50")], "b": {"t": datetime.date(2024, 1, 2), "s": "한|글"}, "c": True}

# value, markdown, json, csv, records
VALUE_CASES = [
    (None, "NULL", "null", "NULL", "NULL"),
    ("", '""', '""', '""', '""'),
    ("NULL", '"NULL"', '"NULL"', '"NULL"', '"NULL"'),
    ('"quoted"', '""quoted""', '"\\"quoted\\""', '"""quoted"""', '""quoted""'),
    ("plain", "plain", '"plain"', "plain", "plain"),
    (" padded ", " padded ", '" padded "', '" padded "', " padded "),
    # CSV: tab and line breaks stay raw in a quoted field; a backslash is doubled.
    ("a|b\nc\td\\e\r", "a\\|b\\nc\\td\\\\e\\r", '"a|b\\nc\\td\\\\e\\r"', '"a|b\nc\td\\\\e\r"', "a|b\\nc\\td\\\\e\\r"),
    ("x,y", "x,y", '"x,y"', '"x,y"', "x,y"),
    ("nul\x00bel\x07", "nul\\x00bel\\x07", '"nul\\u0000bel\\u0007"', "nul\\x00bel\\x07", "nul\\x00bel\\x07"),
    ("line\u2028sep\x85", "line\\u2028sep\\x85", '"line\\u2028sep\\u0085"', '"line\u2028sep\x85"', "line\\u2028sep\\x85"),
    ("한글 😀 👨‍👩‍👧", "한글 😀 👨‍👩‍👧", '"한글 😀 👨‍👩‍👧"', "한글 😀 👨‍👩‍👧", "한글 😀 👨‍👩‍👧"),
    (Text("sub|class"), "sub\\|class", '"sub|class"', "sub|class", "sub|class"),
    (True, "true", "true", "true", "true"),
    (False, "false", "false", "false", "false"),
    (0, "0", "0", "0", "0"),
    (-12345678901234567890, "-12345678901234567890", "-12345678901234567890", "-12345678901234567890", "-12345678901234567890"),
    (1.5, "1.5", "1.5", "1.5", "1.5"),
    (0.1, "0.1", "0.1", "0.1", "0.1"),
    (1e20, "1e+20", "1e+20", "1e+20", "1e+20"),
    (float("nan"), "NaN", '"NaN"', "NaN", "NaN"),
    (float("inf"), "Infinity", '"Infinity"', "Infinity", "Infinity"),
    (float("-inf"), "-Infinity", '"-Infinity"', "-Infinity", "-Infinity"),
    (Decimal("1.10"), "1.10", "1.10", "1.10", "1.10"),
    (Decimal("0.1") + Decimal("0.2"), "0.3", "0.3", "0.3", "0.3"),
    (Decimal("1E+3"), "1000", "1000", "1000", "1000"),
    (Decimal("-0.000001"), "-0.000001", "-0.000001", "-0.000001", "-0.000001"),
    (Decimal("1E+1000"), "1E+1000", "1E+1000", "1E+1000", "1E+1000"),
    (Decimal("NaN"), "NaN", '"NaN"', "NaN", "NaN"),
    (Decimal("sNaN"), "NaN", '"NaN"', "NaN", "NaN"),
    (Decimal("-Infinity"), "-Infinity", '"-Infinity"', "-Infinity", "-Infinity"),
    (
        datetime.datetime(2024, 1, 2, 3, 4, 5),
        "2024-01-02T03:04:05",
        '"2024-01-02T03:04:05"',
        "2024-01-02T03:04:05",
        "2024-01-02T03:04:05",
    ),
    (
        datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=KST),
        "2024-01-02T03:04:05.123456+09:00",
        '"2024-01-02T03:04:05.123456+09:00"',
        "2024-01-02T03:04:05.123456+09:00",
        "2024-01-02T03:04:05.123456+09:00",
    ),
    (datetime.date(2024, 1, 2), "2024-01-02", '"2024-01-02"', "2024-01-02", "2024-01-02"),
    (datetime.time(3, 4, 5), "03:04:05", '"03:04:05"', "03:04:05", "03:04:05"),
    (datetime.time(3, 4, 5, tzinfo=KST), "03:04:05+09:00", '"03:04:05+09:00"', "03:04:05+09:00", "03:04:05+09:00"),
    (datetime.timedelta(days=1, hours=2, minutes=3, seconds=4), "P1DT2H3M4S", '"P1DT2H3M4S"', "P1DT2H3M4S", "P1DT2H3M4S"),
    (datetime.timedelta(seconds=-1), "-PT1S", '"-PT1S"', "-PT1S", "-PT1S"),
    (datetime.timedelta(0), "PT0S", '"PT0S"', "PT0S", "PT0S"),
    (datetime.timedelta(days=30), "P30D", '"P30D"', "P30D", "P30D"),
    (datetime.timedelta(microseconds=500000), "PT0.5S", '"PT0.5S"', "PT0.5S", "PT0.5S"),
    (
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "12345678-1234-5678-1234-567812345678",
        '"12345678-1234-5678-1234-567812345678"',
        "12345678-1234-5678-1234-567812345678",
        "12345678-1234-5678-1234-567812345678",
    ),
    (b"\x00\x01", "<bytea 2 bytes>", '"<bytea 2 bytes>"', "<bytea 2 bytes>", "<bytea 2 bytes>"),
    (memoryview(bytes(1234)), "<bytea 1,234 bytes>", '"<bytea 1,234 bytes>"', '"<bytea 1,234 bytes>"', "<bytea 1,234 bytes>"),
    (bytearray(), "<bytea 0 bytes>", '"<bytea 0 bytes>"', "<bytea 0 bytes>", "<bytea 0 bytes>"),
    (
        NESTED,
        '{"a":[1,null,2.50],"b":{"t":"2024-01-02","s":"한\\|글"},"c":true}',
        '{"a":[1,null,2.50],"b":{"t":"2024-01-02","s":"한|글"},"c":true}',
        '"{""a"":[1,null,2.50],""b"":{""t"":""2024-01-02"",""s"":""한|글""},""c"":true}"',
        '{"a":[1,null,2.50],"b":{"t":"2024-01-02","s":"한|글"},"c":true}',
    ),
    ([1, None, 3], "[1,null,3]", "[1,null,3]", '"[1,null,3]"', "[1,null,3]"),
    ((), "[]", "[]", "[]", "[]"),
    ([float("nan")], '["NaN"]', '["NaN"]', '"[""NaN""]"', '["NaN"]'),
    ("infinity", "infinity", '"infinity"', "infinity", "infinity"),  # db_connector's raw date text
    ("0044-03-15 BC", "0044-03-15 BC", '"0044-03-15 BC"', "0044-03-15 BC", "0044-03-15 BC"),
    (psycopg2.extras.NumericRange(1, 5), "[1,5)", '"[1,5)"', '"[1,5)"', "[1,5)"),
    (
        psycopg2.extras.DateRange(None, datetime.date(2024, 1, 1), "(]"),
        "(,2024-01-01]",
        '"(,2024-01-01]"',
        '"(,2024-01-01]"',
        "(,2024-01-01]",
    ),
    (psycopg2.extras.NumericRange(empty=True), "empty", '"empty"', "empty", "empty"),
    (Custom(), "custom\\|thing", '"custom|thing"', "custom|thing", "custom|thing"),
]


def _case_id(value: object) -> str:
    """A stable test id: a memoryview's repr holds its address, which differs between processes."""
    return f"memoryview({bytes(value)[:8]!r})" if isinstance(value, memoryview) else repr(value)[:30]


@pytest.mark.parametrize("value, markdown, as_json, as_csv, record", VALUE_CASES, ids=_case_id)
def test_every_value_renders_faithfully_in_every_format(value, markdown, as_json, as_csv, record):
    assert pb.format_value(value) == markdown
    assert pb.format_value(value, fmt="json") == as_json
    assert pb.format_value(value, fmt="csv") == as_csv
    assert pb.format_value(value, fmt="records") == record
    json.loads(as_json)  # always valid JSON


def test_lone_surrogates_never_reach_the_prompt_raw():
    rows = [{"a\ud800": "x\udfff"}]
    assert pb.format_db_results(rows, "csv") == "a\ufffd\nx\ufffd"
    assert pb.format_db_results(rows, "json") == '{"a\\ud800":"x\\udfff"}'
    assert pb.format_db_results(rows) == "| a\\ud800 |\n|---|\n| x\\udfff |"
    text = pb.build_prompt({"query": "q\ud800", "results": rows}, "{query} {data}", "c\ud800").text
    assert text.encode("utf-8").decode("utf-8") == "q\ufffd\n| a\\ud800 |\n|---|\n| x\\udfff |\n\nAdditional context:\nc\ufffd"


def test_huge_integer_does_not_crash():
    text = pb.format_value(10**5000)
    assert text == "<integer of about 5,000 digits>"
    assert json.loads(pb.format_value(10**5000, fmt="json")) == text


@pytest.mark.parametrize(
    "value, limit, expected",
    [
        ("가나다라마바사", 3, "가나다…(+4 chars)"),
        ("abc", 3, "abc"),
        ("a|b|c|d", 3, "a\\|b…(+4 chars)"),  # cut before escaping: no half escape
        ("x" * 10_000_000, 5, "xxxxx…(+9,999,995 chars)"),
        (Decimal("12345.678"), 4, "1234…(+5 chars)"),
        ({"k": "v" * 50}, 10, '{"k":"vvvv…(+48 chars)'),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_long_values_are_shortened_with_a_visible_marker(value, limit, expected):
    assert pb.format_value(value, max_cell_chars=limit) == expected


def test_shortened_json_values_stay_valid_json():
    assert json.loads(pb.format_value("가나다라마바사", fmt="json", max_cell_chars=3)) == "가나다…(+4 chars)"
    # An object too long for the limit becomes a string holding its shortened JSON text.
    assert json.loads(pb.format_value({"k": "v" * 50}, fmt="json", max_cell_chars=10)) == '{"k":"vvvv…(+48 chars)'
    assert json.loads(pb.format_value({"k": 1}, fmt="json", max_cell_chars=10)) == {"k": 1}


PG_SELECT = r"""
SELECT NULL::text AS null_text, ''::text AS empty_text, 'NULL'::text AS null_word,
       1.10::numeric AS num, 'NaN'::numeric AS num_nan, 1e-7::numeric(20,10) AS num_small,
       42::int AS int4, 9007199254740993::bigint AS int8, true AS bool,
       1.5::float8 AS f8, 'Infinity'::float8 AS f8_inf,
       '2024-01-02 03:04:05+09'::timestamptz AS tstz, now()::timestamptz AS now_tz,
       '2024-01-02 03:04:05.5'::timestamp AS ts, '2024-01-02'::date AS d,
       '03:04:05'::time AS t, '03:04:05+09'::timetz AS ttz,
       '1 day 02:03:04'::interval AS iv, '-00:00:01'::interval AS iv_neg,
       gen_random_uuid() AS random_uuid, '12345678-1234-5678-1234-567812345678'::uuid AS fixed_uuid,
       '\x0102'::bytea AS bin, '{"a":[1,2.50],"b":null}'::jsonb AS jb, '{"x": "한글"}'::json AS j,
       ARRAY[1,NULL,3] AS arr, ARRAY['a,b','{x}','NULL'] AS text_arr,
       E'한글 😀 a|b\nc\t"q"' AS tricky, 'infinity'::date AS inf_date, '0044-03-15 BC'::date AS bc_date,
       '[1,5)'::int4range AS rng, 'x'::char(3) AS padded
"""

FIXED_UUID = "12345678-1234-5678-1234-567812345678"

# column, markdown, json, csv (None: checked by pattern below)
PG_EXPECTED = [
    ("null_text", "NULL", "null", "NULL"),
    ("empty_text", '""', '""', '""'),
    ("null_word", '"NULL"', '"NULL"', '"NULL"'),
    ("num", "1.10", "1.10", "1.10"),
    ("num_nan", "NaN", '"NaN"', "NaN"),
    ("num_small", "0.0000001000", "0.0000001000", "0.0000001000"),
    ("int4", "42", "42", "42"),
    ("int8", "9007199254740993", "9007199254740993", "9007199254740993"),
    ("bool", "true", "true", "true"),
    ("f8", "1.5", "1.5", "1.5"),
    ("f8_inf", "Infinity", '"Infinity"', "Infinity"),
    ("tstz", None, None, None),  # depends on the session time zone; offset checked below
    ("now_tz", None, None, None),
    ("ts", "2024-01-02T03:04:05.500000", '"2024-01-02T03:04:05.500000"', "2024-01-02T03:04:05.500000"),
    ("d", "2024-01-02", '"2024-01-02"', "2024-01-02"),
    ("t", "03:04:05", '"03:04:05"', "03:04:05"),
    ("ttz", "03:04:05+09:00", '"03:04:05+09:00"', "03:04:05+09:00"),
    ("iv", "P1DT2H3M4S", '"P1DT2H3M4S"', "P1DT2H3M4S"),
    ("iv_neg", "-PT1S", '"-PT1S"', "-PT1S"),
    ("random_uuid", None, None, None),
    ("fixed_uuid", FIXED_UUID, f'"{FIXED_UUID}"', FIXED_UUID),
    ("bin", "<bytea 2 bytes>", '"<bytea 2 bytes>"', "<bytea 2 bytes>"),
    ("jb", '{"a":[1,2.5],"b":null}', '{"a":[1,2.5],"b":null}', '"{""a"":[1,2.5],""b"":null}"'),
    ("j", '{"x":"한글"}', '{"x":"한글"}', '"{""x"":""한글""}"'),
    ("arr", "[1,null,3]", "[1,null,3]", '"[1,null,3]"'),
    ("text_arr", '["a,b","{x}","NULL"]', '["a,b","{x}","NULL"]', '"[""a,b"",""{x}"",""NULL""]"'),
    ("tricky", '한글 😀 a\\|b\\nc\\t"q"', '"한글 😀 a|b\\nc\\t\\"q\\""', '"한글 😀 a|b\nc\t""q"""'),
    ("inf_date", "infinity", '"infinity"', "infinity"),
    ("bc_date", "0044-03-15 BC", '"0044-03-15 BC"', "0044-03-15 BC"),
    ("rng", "[1,5)", '"[1,5)"', '"[1,5)"'),
    ("padded", "x  ", '"x  "', '"x  "'),
]


def test_values_fetched_from_postgresql_render_faithfully(db):
    # Fetched through db_connector from the throwaway test database, as the pipeline fetches them.
    row = db.execute_query(PG_SELECT)[0]
    assert [c for c, *_ in PG_EXPECTED] == list(row.keys())
    for column, markdown, as_json, as_csv in PG_EXPECTED:
        if markdown is None:
            continue
        value = row[column]
        assert (column, pb.format_value(value)) == (column, markdown)
        assert (column, pb.format_value(value, fmt="json")) == (column, as_json)
        assert (column, pb.format_value(value, fmt="csv")) == (column, as_csv)
    iso_with_offset = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d")
    assert iso_with_offset.fullmatch(pb.format_value(row["tstz"]))
    assert datetime.datetime.fromisoformat(pb.format_value(row["tstz"])) == datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=KST)
    assert iso_with_offset.fullmatch(pb.format_value(row["now_tz"]))
    assert str(uuid.UUID(pb.format_value(row["random_uuid"]))) == pb.format_value(row["random_uuid"])

    # The whole fetched row survives each format and parses back.
    data = {"query": PG_SELECT, "results": [row], "row_count": 1}
    as_json = json.loads(pb.build_prompt(data, "{data}", data_format="json", max_tokens=BIG).text)
    assert list(as_json) == list(row.keys())
    assert as_json["null_text"] is None and as_json["empty_text"] == "" and as_json["tricky"] == row["tricky"]
    assert as_json["num"] == 1.1 and as_json["jb"] == {"a": [1, 2.5], "b": None}
    header, fields = parse_csv(pb.build_prompt(data, "{data}", data_format="csv", max_tokens=BIG).text)
    assert header == list(row.keys())
    parsed = dict(zip(header, fields[0]))
    assert parsed["null_text"] is None and parsed["empty_text"] == "" and parsed["null_word"] == "NULL"
    assert parsed["tricky"] == row["tricky"]
    table = pb.build_prompt(data, "{data}", max_tokens=BIG).text.split("\n")
    assert len(table) == 3  # header, separator, one row: nothing broke a line
    assert parse_markdown_row(table[2]) == [None if v is None else value_format.plain_text(v) for v in row.values()]


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------

ORDERS = [
    {
        "order_id": 100231,
        "customer": "권민준",
        "product": "블루투스 스피커",
        "price": Decimal("54630.00"),
        "ordered_at": datetime.datetime(2024, 8, 11, 2, 1, 1, tzinfo=KST),
        "rating": 4,
        "review": "소리가 깨끗하고 노이즈 캔슬링이 훌륭합니다.",
    },
    {
        "order_id": 100232,
        "customer": "배혜숙",
        "product": "Wireless Mouse M720",
        "price": Decimal("39900.00"),
        "ordered_at": datetime.datetime(2024, 8, 12, 14, 30, 0, tzinfo=KST),
        "rating": None,
        "review": "Great value for the price | works with my Mac too.",
    },
]

# Each expected text with its real token count in cl100k_base (Phi-4's base
# vocabulary), measured once with the bpe-openai package.
FORMATTED = {
    "markdown": (
        "| order_id | customer | product | price | ordered_at | rating | review |\n"
        "|---|---|---|---|---|---|---|\n"
        "| 100231 | 권민준 | 블루투스 스피커 | 54630.00 | 2024-08-11T02:01:01+09:00 | 4 "
        "| 소리가 깨끗하고 노이즈 캔슬링이 훌륭합니다. |\n"
        "| 100232 | 배혜숙 | Wireless Mouse M720 | 39900.00 | 2024-08-12T14:30:00+09:00 | NULL "
        "| Great value for the price \\| works with my Mac too. |",
        179,
    ),
    "json": (
        '{"order_id":100231,"customer":"권민준","product":"블루투스 스피커","price":54630.00,'
        '"ordered_at":"2024-08-11T02:01:01+09:00","rating":4,"review":"소리가 깨끗하고 노이즈 캔슬링이 훌륭합니다."}\n'
        '{"order_id":100232,"customer":"배혜숙","product":"Wireless Mouse M720","price":39900.00,'
        '"ordered_at":"2024-08-12T14:30:00+09:00","rating":null,"review":"Great value for the price | works with my Mac too."}',
        172,
    ),
    "csv": (
        "order_id,customer,product,price,ordered_at,rating,review\n"
        "100231,권민준,블루투스 스피커,54630.00,2024-08-11T02:01:01+09:00,4,소리가 깨끗하고 노이즈 캔슬링이 훌륭합니다.\n"
        "100232,배혜숙,Wireless Mouse M720,39900.00,2024-08-12T14:30:00+09:00,NULL,"
        "Great value for the price | works with my Mac too.",
        151,
    ),
    "records": (
        "[row 1]\norder_id: 100231\ncustomer: 권민준\nproduct: 블루투스 스피커\nprice: 54630.00\n"
        "ordered_at: 2024-08-11T02:01:01+09:00\nrating: 4\nreview: 소리가 깨끗하고 노이즈 캔슬링이 훌륭합니다.\n\n"
        "[row 2]\norder_id: 100232\ncustomer: 배혜숙\nproduct: Wireless Mouse M720\nprice: 39900.00\n"
        "ordered_at: 2024-08-12T14:30:00+09:00\nrating: NULL\nreview: Great value for the price | works with my Mac too.",
        183,
    ),
}


@pytest.mark.parametrize("fmt", pb.FORMATS)
def test_formats_render_rows_in_query_column_order(fmt):
    expected, _tokens = FORMATTED[fmt]
    assert pb.format_db_results(ORDERS, fmt) == expected
    assert pb.format_db_results({"query": "q", "results": ORDERS}, format=fmt) == expected
    assert pb.build_prompt(ORDERS, "{data}", data_format=fmt, max_tokens=BIG).text == expected


def test_markdown_is_the_default_format():
    assert pb.format_db_results(ORDERS) == FORMATTED["markdown"][0]


def test_columns_keep_the_query_order_not_alphabetical():
    rows = [{"z": 1, "a": 2, "m": 3}]
    assert pb.format_db_results(rows, "csv") == "z,a,m\n1,2,3"
    assert list(json.loads(pb.format_db_results(rows, "json"))) == ["z", "a", "m"]
    # db_data["columns"] (as the pipeline passes it) wins over the dict order.
    data = {"results": [{"a": 2, "z": 1}], "columns": ["z", "a"]}
    assert pb.format_db_results(data, "csv") == "z,a\n1,2"
    assert pb.build_prompt({**data, "results": []}, "{columns}: {data}").text == "z, a:\n(no rows)"


def test_json_format_parses_back_line_by_line():
    lines = FORMATTED["json"][0].split("\n")
    parsed = [json.loads(line, parse_float=Decimal) for line in lines]
    assert parsed[0]["price"] == Decimal("54630.00") and str(parsed[0]["price"]) == "54630.00"
    assert parsed[1]["rating"] is None


def test_csv_null_rule_distinguishes_null_the_word_and_empty_text():
    rows = [{"a": None, "b": "NULL", "c": "", "d": "null", "e": 'say "hi", ok'}]
    text = pb.format_db_results(rows, "csv")
    assert text == 'a,b,c,d,e\nNULL,"NULL","",null,"say ""hi"", ok"'
    assert parse_csv(text) == (["a", "b", "c", "d", "e"], [[None, "NULL", "", "null", 'say "hi", ok']])


def test_records_escape_newlines_so_a_value_cannot_fake_a_field():
    text = pb.format_db_results([{"a": "x\nb: injected", "b": 1}], "records")
    assert text == "[row 1]\na: x\\nb: injected\nb: 1"


def test_zero_rows():
    assert pb.format_db_results([]) == "(no rows)"
    result = pb.build_prompt({"query": "SELECT 1 WHERE false", "results": [], "row_count": 0}, "{data}")
    assert (result.text, result.rows_shown, result.rows_total, result.truncated) == ("(no rows)", 0, 0, False)


def test_rows_without_columns():
    assert pb.format_db_results([{}, {}]) == "(2 rows with no columns)"
    assert pb.build_prompt([{}], "{data}").text == "(1 rows with no columns)"


# ---------------------------------------------------------------------------
# Token estimate and budget
# ---------------------------------------------------------------------------

# text, real token count in cl100k_base (measured with bpe-openai 0.1.4)
MEASURED = [
    ("배송이 빠르고 포장도 꼼꼼했어요. 다음에도 구매할게요!", 37),
    ("두 번째 구매인데 역시 좋네요. 가족들도 좋아해요 😀", 31),
    ("서울특별시 강남구 테헤란로 123", 23),
    ("다음 데이터를 분석해주세요", 10),
    ("Fast delivery and careful packaging. Will buy again!", 10),
    ("SELECT o.id, c.name, o.price FROM orders o JOIN customers c ON c.id = o.customer_id", 22),
    ("2024-08-11T02:01:01+09:00", 16),
    ("f605d8c4-e96e-4dca-9738-2161f4c193b8", 25),
    ("12345.67", 4),
    ("<bytea 1,234 bytes>", 8),
    ('{"a":[1,2.50],"b":{"c":null}}', 15),
    ("P1DT2H3M4S", 9),
] + [FORMATTED[fmt] for fmt in pb.FORMATS]


@pytest.mark.parametrize("text, real", MEASURED, ids=lambda v: repr(v)[:25])
def test_token_estimate_never_undercounts_realistic_text(text, real):
    estimate = pb.estimate_tokens(text)
    assert real <= estimate <= 2.5 * real


def test_token_estimate_rules():
    assert pb.estimate_tokens("") == 0
    assert pb.estimate_tokens("가나다") == 6  # Hangul: 2 per syllable
    assert pb.estimate_tokens("😀") == 4  # other non-ASCII: UTF-8 bytes
    assert pb.estimate_tokens("1234567") == 3  # digits: groups of three
    assert pb.estimate_tokens("hello world") == 4  # letters: 1 per 4, the blank merges
    assert pb.estimate_tokens("xzqwrtpk") == 4  # random-looking letters: 1 per 2
    assert pb.estimate_tokens("| 1 |") == 4  # pipes 1 each, blank before a digit 1
    assert pb.estimate_tokens("\ud800") == 3  # a lone surrogate does not crash


def test_default_token_budget():
    assert pb.default_token_budget() == 16384 - 512 - pb.DEFAULT_RESERVE_TOKENS
    assert pb.default_token_budget(8192, 1024, 0) == 7168
    with pytest.raises(PromptError, match="No room for a prompt"):
        pb.default_token_budget(512, 512)


# The budget tests below pin the estimate's arithmetic, so they count with it whatever is
# installed; tests/test_row_packer.py covers the real tokenizer.
build_estimated = functools.partial(pb.build_prompt, counter=ESTIMATE)


def many_rows(n: int) -> list[dict]:
    return [{"id": i, "name": f"고객{i}", "note": "배송 완료" if i % 2 else None} for i in range(n)]


def test_rows_that_do_not_fit_are_dropped_whole_and_the_prompt_says_so():
    rows = many_rows(5000)
    result = build_estimated({"query": "SELECT", "results": rows, "row_count": 5000}, "{data}", max_tokens=2000)
    assert result.truncated and result.rows_total == 5000
    assert 10 < result.rows_shown < 5000
    lines = result.text.split("\n")
    assert lines[-1] == f"(showing {result.rows_shown:,} of 5,000 rows)"
    assert lines[-2] == ""
    assert lines[2 : 2 + result.rows_shown] == pb.format_db_results(rows[: result.rows_shown]).split("\n")[2:]
    assert result.estimated_tokens == pb.estimate_tokens(result.text) <= 2000
    # One more row would not have fitted.
    bigger = build_estimated(rows[: result.rows_shown + 1], "{data}", max_tokens=BIG)
    assert bigger.estimated_tokens > 2000 or "(showing" not in bigger.text


@pytest.mark.parametrize("fmt", pb.FORMATS)
def test_budget_boundary_is_exact(fmt):
    rows = many_rows(30)
    full = build_estimated(rows, "분석: {data}", data_format=fmt, max_tokens=BIG)
    assert not full.truncated
    exact = build_estimated(rows, "분석: {data}", data_format=fmt, max_tokens=full.estimated_tokens)
    assert exact.text == full.text
    cut = build_estimated(rows, "분석: {data}", data_format=fmt, max_tokens=full.estimated_tokens - 1)
    assert cut.truncated and cut.rows_shown < 30 and cut.estimated_tokens <= full.estimated_tokens - 1
    assert cut.text.endswith(f"\n\n(showing {cut.rows_shown} of 30 rows)")
    by_chars = build_estimated(rows, "분석: {data}", data_format=fmt, max_tokens=BIG, max_chars=len(full.text) - 1)
    assert by_chars.truncated and by_chars.char_count <= len(full.text) - 1


def test_max_chars_and_max_tokens_bound_the_whole_prompt_including_template_and_context():
    context = "맥락 " * 200
    result = build_estimated(many_rows(1000), "지시문 " * 100 + "{data}", context, max_chars=3000, max_tokens=BIG)
    assert result.char_count == len(result.text) <= 3000
    assert result.text.endswith(context)
    assert 0 < result.rows_shown < 1000


def test_row_cap_note_when_database_had_more_rows():
    rows = many_rows(3)
    shown_all = pb.build_prompt({"results": rows, "more_rows": True}, "{data}")
    assert shown_all.text.endswith("\n\n(showing all 3 fetched rows; the query returned more)")
    assert (shown_all.rows_shown, shown_all.rows_total, shown_all.truncated) == (3, 3, False)
    cut = pb.build_prompt({"results": rows, "more_rows": True}, "{data}", max_rows=2)
    assert cut.text.endswith("\n\n(showing 2 of at least 3 rows)")
    counted = pb.build_prompt({"results": rows, "row_count": 1000}, "{data} {row_count}")
    assert counted.text.endswith("\n\n(showing 3 of 1,000 rows) 1000")
    assert (counted.rows_total, counted.truncated) == (1000, False)
    smaller = pb.build_prompt({"results": rows, "row_count": 1}, "{data}")
    assert smaller.rows_total == 3  # a row_count below the rows we hold is ignored


def test_max_rows():
    result = pb.build_prompt(many_rows(10), "{data}", max_rows=4)
    assert (result.rows_shown, result.truncated) == (4, True)
    assert result.text.endswith("| 3 | 고객3 | 배송 완료 |\n\n(showing 4 of 10 rows)")
    none = pb.build_prompt(many_rows(10), "{data}", max_rows=0)
    assert none.text == "| id | name | note |\n|---|---|---|\n\n(showing 0 of 10 rows)"


def test_template_and_context_alone_over_budget_says_by_how_much():
    with pytest.raises(PromptError) as info:
        build_estimated(many_rows(3), "x" * 40 + " {data}", "가" * 100, max_tokens=100)
    message = info.value.message
    assert "template, context and query alone exceed" in message
    tokens = pb.estimate_tokens("x" * 40 + "\n\n\nAdditional context:\n" + "가" * 100)
    assert f"about {tokens:,} tokens against a budget of 100 (over by {tokens - 100:,})" in message
    with pytest.raises(PromptError, match=r"5,001 characters against a limit of 4,000 \(over by 1,001\)"):
        build_estimated(many_rows(3), "가" * 5000 + "{data}", max_chars=4000, max_tokens=BIG)


def test_not_even_one_row_fitting_is_an_error():
    rows = [{"text": "긴 리뷰 " * 100}]
    with pytest.raises(PromptError) as info:
        build_estimated(rows, "{data}", max_tokens=200)
    assert "Not even one row fits" in info.value.message and "over by" in info.value.message
    assert "--max-cell-chars (now 500)" in info.value.hint and "--prompt-budget (now 200 tokens" in info.value.hint
    # With a smaller per-value limit the same row fits.
    assert build_estimated(rows, "{data}", max_tokens=200, max_cell_chars=50).rows_shown == 1


def test_system_prompt_shrinks_the_default_budget():
    rows = many_rows(5000)
    plain = build_estimated(rows)
    system = "You are a careful data analyst. " * 100
    with_system = build_estimated(rows, system_prompt=system)
    limit = pb.default_token_budget() - pb.estimate_tokens(system) - 2
    assert plain.estimated_tokens <= pb.default_token_budget()
    assert with_system.estimated_tokens <= limit < plain.estimated_tokens
    assert with_system.rows_shown < plain.rows_shown
    assert system not in with_system.text


def test_context_size_and_answer_length_set_the_default_budget():
    rows = many_rows(5000)
    small = build_estimated(rows, context_tokens=4096, max_new_tokens=1024)
    assert small.estimated_tokens <= 4096 - 1024 - pb.DEFAULT_RESERVE_TOKENS
    assert small.rows_shown < build_estimated(rows).rows_shown


def test_repeated_data_placeholder_counts_each_copy():
    result = build_estimated(many_rows(500), "{data}\n---\n{data}", max_tokens=1000)
    assert result.estimated_tokens <= 1000
    first, second = result.text.split("\n---\n")
    assert first == second and first.endswith(f"(showing {result.rows_shown} of 500 rows)")


class CountingRows(Sequence):
    """A 100,000-row result that records which rows were read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.read: set[int] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise AssertionError("the builder must not copy the rows")
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.read.add(i)
        return {"id": i, "product": "무선 마우스", "price": Decimal("19900.00")}


@pytest.mark.parametrize("fmt", pb.FORMATS)
def test_only_the_rows_shown_are_formatted(fmt):
    rows = CountingRows(100_000)
    result = pb.build_prompt({"query": "SELECT", "results": rows, "row_count": 100_000}, data_format=fmt)
    assert result.truncated and result.rows_total == 100_000
    assert f"(showing {result.rows_shown:,} of 100,000 rows)" in result.text
    # The shown rows, the one that did not fit, and any given back to make room for the note.
    assert rows.read == set(range(len(rows.read))) and len(rows.read) <= result.rows_shown + 3


def test_cell_limit_default_keeps_huge_values_from_eating_the_budget():
    rows = [{"id": i, "blob": "가" * 100_000} for i in range(10)]
    result = pb.build_prompt(rows, "{data}")
    assert result.rows_shown == 10
    assert "…(+99,500 chars)" in result.text
    unlimited = pb.build_prompt(rows, "{data}", max_cell_chars=None, max_tokens=BIG)
    assert unlimited.char_count > 1_000_000


# ---------------------------------------------------------------------------
# Properties over arbitrary rows
# ---------------------------------------------------------------------------


_CSV_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def csv_unescape(field: str) -> str:
    """Undo the CSV format's escapes: ``\\\\`` is a backslash, ``\\xNN`` a control character."""
    return _CSV_ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)), field)


def parse_csv(text: str) -> tuple[list, list[list]]:
    """RFC 4180 reader that keeps the NULL rule (an unquoted NULL field is None) and undoes escapes."""
    records, fields, i, n = [], [], 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, chunk = i + 1, []
            while True:
                k = text.index('"', j)
                chunk.append(text[j:k])
                if text.startswith('""', k):
                    chunk.append('"')
                    j = k + 2
                else:
                    i = k + 1
                    break
            fields.append(csv_unescape("".join(chunk)))
        else:
            j = i
            while j < n and text[j] not in ",\n":
                j += 1
            raw = text[i:j]
            assert '"' not in raw, f"stray quote in unquoted field {raw!r}"
            fields.append(None if raw == "NULL" else csv_unescape(raw))
            i = j
        if i >= n or text[i] == "\n":
            records.append(fields)
            fields = []
            if i >= n:
                break
            i += 1
            if i >= n:
                break
        else:
            assert text[i] == ",", f"garbage after a quoted field at {i}"
            i += 1
    return records[0], records[1:]


_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", re.S)


def _unescape(cell: str) -> str | None:
    if cell == "NULL":
        return None
    simple = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "|": "|"}
    text = _UNESCAPE.sub(lambda m: simple.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), cell)
    return text[1:-1] if text.startswith('"') else text


def parse_markdown_row(line: str) -> list:
    assert line.startswith("| ") and line.endswith(" |"), line
    inner, cells, current, i = line[2:-2], [], [], 0
    while i < len(inner):
        if inner[i] == "\\":
            current.append(inner[i : i + 2])
            i += 2
        elif inner.startswith(" | ", i):
            cells.append("".join(current))
            current, i = [], i + 3
        else:
            current.append(inner[i])
            i += 1
    cells.append("".join(current))
    return [_unescape(c) for c in cells]


def shortened(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else f"{text[:limit]}…(+{len(text) - limit:,} chars)"


def expected_text(value, limit):
    """What a value reads back as from CSV or Markdown (None for NULL)."""
    if value is None:
        return None
    if isinstance(value, bool):
        plain = "true" if value else "false"
    elif isinstance(value, Decimal):
        plain = format(value, "f")
    else:
        plain = str(value)
    return shortened(plain, limit)


def expected_json(value, limit):
    if value is None or isinstance(value, str):
        return None if value is None else shortened(value, limit)
    text = expected_text(value, limit)
    return json.loads(text, parse_float=Decimal) if text == expected_text(value, None) else text


texts = st.text(max_size=60) | st.sampled_from(["", "NULL", '"', '""', "|", "\\", "\n", "{data}", "{{x}}", "a,b", " x "])
scalars = st.one_of(
    st.none(),
    texts,
    st.text(min_size=200, max_size=2000),
    st.integers(),
    st.booleans(),
    st.builds(lambda i, e: Decimal(i).scaleb(e), st.integers(-(10**12), 10**12), st.integers(-8, 4)),
)
columns = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True)
templates = st.sampled_from(["{data}", "분석: {data}", '{"a": {"b": 1}} {data} {{data}}', "요약 {row_count} {columns}"])


@st.composite
def datasets(draw, values=scalars):
    names = draw(columns)
    rows = draw(st.lists(st.tuples(*[values] * len(names)).map(lambda vs: dict(zip(names, vs))), max_size=25))
    return names, rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=datasets(),
    fmt=st.sampled_from(["json", "csv", "markdown"]),
    template=templates,
    context=st.none() | st.text(max_size=80),
    max_tokens=st.integers(20, 3000),
    max_chars=st.none() | st.integers(20, 6000),
    max_cell_chars=st.none() | st.integers(1, 40) | st.just(500),
)
def test_property_prompt_fits_and_every_row_shown_parses_back(
    data, fmt, template, context, max_tokens, max_chars, max_cell_chars
):
    names, rows = data
    kwargs = dict(data_format=fmt, max_tokens=max_tokens, max_chars=max_chars, max_cell_chars=max_cell_chars)
    try:
        result = build_estimated({"query": "SELECT x", "results": rows}, template, context, **kwargs)
    except PromptError as exc:
        # Only a budget too small even for the template (+ one row) may fail, and then truly.
        assert "alone exceed" in exc.message or "Not even one row fits" in exc.message
        unbounded = {**kwargs, "max_tokens": BIG, "max_chars": None, "max_rows": 1}
        smallest = build_estimated({"query": "SELECT x", "results": rows}, template, context, **unbounded)
        assert smallest.estimated_tokens > max_tokens or (max_chars is not None and smallest.char_count > max_chars)
        return

    assert result.estimated_tokens == pb.estimate_tokens(result.text) <= max_tokens
    assert max_chars is None or result.char_count <= max_chars
    assert result.char_count == len(result.text)
    assert result.rows_total == len(rows) and result.truncated == (result.rows_shown < len(rows))
    assert rows == [] or result.rows_shown >= 1

    shown = rows[: result.rows_shown]
    block = build_estimated(
        {"query": "SELECT x", "results": shown}, "{data}", **{**kwargs, "max_tokens": BIG, "max_chars": None}
    ).text
    assert block in result.text  # the shown rows appear exactly as formatted on their own
    if not rows:
        assert block == "(no rows)"
        return
    if fmt == "json":
        lines = block.split("\n")
        assert len(lines) == len(shown)
        for line, row in zip(lines, shown):
            parsed = json.loads(line, parse_float=Decimal)
            assert list(parsed) == names
            assert parsed == {n: expected_json(row[n], max_cell_chars) for n in names}
    elif fmt == "csv":
        header, records = parse_csv(block)
        assert header == names
        assert records == [[expected_text(row[n], max_cell_chars) for n in names] for row in shown]
    else:
        lines = block.split("\n")
        assert len(lines) == 2 + len(shown)
        assert parse_markdown_row(lines[0]) == names
        for line, row in zip(lines[2:], shown):
            assert parse_markdown_row(line) == [expected_text(row[n], max_cell_chars) for n in names]
    if result.truncated:
        assert f"(showing {result.rows_shown:,} of {len(rows):,} rows)" in result.text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.decimals(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
any_values = st.one_of(
    scalars,
    st.floats(),
    st.decimals(),
    st.datetimes(timezones=st.sampled_from([None, UTC, KST])),
    st.dates(),
    st.times(timezones=st.sampled_from([None, KST])),
    st.timedeltas(),
    st.uuids(),
    st.binary(max_size=20),
    st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Zl", "Zp", "So"]), max_size=10),
    json_values,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=datasets(values=any_values),
    fmt=st.sampled_from(pb.FORMATS),
    max_tokens=st.integers(300, 5000),
    max_cell_chars=st.none() | st.integers(1, 60),
)
def test_property_any_postgres_like_value_builds_a_valid_prompt(data, fmt, max_tokens, max_cell_chars):
    names, rows = data
    kwargs = dict(data_format=fmt, max_cell_chars=max_cell_chars)
    try:
        result = build_estimated(rows, "{data}", max_tokens=max_tokens, **kwargs)
    except PromptError as exc:
        assert "Not even one row fits" in exc.message
        assert build_estimated(rows, "{data}", max_tokens=BIG, max_rows=1, **kwargs).estimated_tokens > max_tokens
        return
    assert result.estimated_tokens <= max_tokens
    result.text.encode("utf-8")  # lone surrogates were escaped
    body = result.text.split("\n\n(showing")[0]
    if fmt == "json" and rows:
        for line in body.split("\n"):
            json.loads(line)
    if fmt == "markdown" and rows:
        assert len(body.split("\n")) == 2 + result.rows_shown
        for line in body.split("\n")[2:]:
            assert len(parse_markdown_row(line)) == len(names)
    if fmt == "csv" and rows:
        header, records = parse_csv(body)
        assert header == names and len(records) == result.rows_shown


braces_text = st.text(alphabet=st.sampled_from(list('{}"a1 _:\n[]가|')), max_size=40).filter(
    lambda t: not re.search(r"\{[A-Za-z_]", t)
)


@settings(max_examples=150, deadline=None)
@given(literal=braces_text)
def test_property_braces_that_are_not_placeholders_stay_as_written(literal):
    result = pb.build_prompt(ROWS, literal + "\n{data}", max_tokens=BIG)
    assert result.text == literal + "\n" + TABLE


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=300) | st.text(alphabet="ab cdXYZ0123 \t\n|{}가나다😀é", max_size=300))
def test_token_estimate_never_exceeds_utf8_bytes(text):
    # build_prompt costs rows by their byte length until the budget comes near;
    # that is only safe while no text is estimated above its UTF-8 size.
    assert pb.estimate_tokens(text) <= len(text.encode("utf-8", "surrogatepass"))


def test_sample_reviews_from_the_test_database_make_a_faithful_prompt(db):
    rows = db.execute_query("SELECT id, title, body FROM reviews ORDER BY id")
    result = pb.build_prompt({"query": "reviews", "results": rows, "row_count": len(rows)})
    assert (result.rows_shown, result.rows_total, result.truncated) == (20, 20, False)
    table = [line for line in result.text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 20  # header, separator, one line per row: no cell broke the table
    assert "| 20 | 용량 충분 | 여행 갈 때 폰 세 번 충전했어요.\\n배송도 빨랐습니다. |" in result.text
    assert '| 7 | "" | 가격 대비 괜찮아요. |' in result.text  # empty title, not NULL
    assert "| 5 | NULL | Good keyboard." in result.text  # NULL title


# ---------------------------------------------------------------------------
# Rows from an iterator (a streaming cursor)
# ---------------------------------------------------------------------------


class Stream:
    """An iterator of rows that counts how many were taken; ``count_remaining`` is optional."""

    def __init__(self, rows: list[dict], countable: bool = False) -> None:
        self.rows, self.taken, self.counted = rows, 0, 0
        if countable:
            self.count_remaining = self._count_remaining

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken >= len(self.rows):
            raise StopIteration
        self.taken += 1
        return self.rows[self.taken - 1]

    def _count_remaining(self) -> int:
        self.counted += 1
        return len(self.rows) - self.taken


def test_an_iterator_is_read_only_until_the_prompt_is_full():
    stream = Stream(many_rows(100_000))
    result = build_estimated({"query": "SELECT", "results": stream}, "{data}", max_tokens=2000)
    assert 10 < result.rows_shown < 1000
    # The rows shown, the one that did not fit, and any handed back to make room for the note.
    assert result.rows_shown < stream.taken == result.rows_read <= result.rows_shown + 3
    assert (result.input_exhausted, result.rows_total_exact, result.truncated) == (False, False, True)
    assert result.rows_total == result.rows_read
    assert result.text.endswith(f"\n\n(showing {result.rows_shown:,} of at least {result.rows_read:,} rows)")
    assert result.estimated_tokens == pb.estimate_tokens(result.text) <= 2000
    # Exactly what the same rows give from a list, apart from the total in the note.
    listed = build_estimated({"query": "SELECT", "results": many_rows(result.rows_read), "more_rows": True}, "{data}",
                             max_tokens=2000)
    assert listed.text == result.text


def test_an_iterator_that_can_count_its_remaining_rows_gives_the_exact_total():
    stream = Stream(many_rows(5000), countable=True)
    result = build_estimated({"results": stream}, "{data}\n({row_count} rows in all)", max_tokens=2000)
    assert stream.counted == 1 and result.rows_shown < stream.taken <= result.rows_shown + 3
    assert (result.rows_total, result.rows_total_exact, result.truncated) == (5000, True, True)
    assert result.text.endswith(f"(showing {result.rows_shown:,} of 5,000 rows)\n(5000 rows in all)")
    assert result.estimated_tokens == pb.estimate_tokens(result.text) <= 2000


def test_an_iterator_with_a_known_row_count_is_not_counted():
    stream = Stream(many_rows(300), countable=True)
    result = build_estimated({"results": stream, "row_count": 300}, "{data}", max_rows=10)
    assert stream.counted == 0 and stream.taken == 11
    assert result.text.endswith("(showing 10 of 300 rows)") and result.rows_total == 300


def test_an_iterator_that_fits_whole_is_read_to_its_end():
    stream = Stream(many_rows(12))
    result = pb.build_prompt({"results": stream, "query": "q"}, "{data} {row_count}")
    assert (result.rows_shown, result.rows_total, result.truncated, result.input_exhausted) == (12, 12, False, True)
    assert "(showing" not in result.text and result.text.endswith(" 12")
    assert pb.build_prompt(iter([]), "{data}").text == "(no rows)"
    assert pb.build_prompt((r for r in [{}, {}]), "{data}").text == "(2 rows with no columns)"
    with pytest.raises(PromptError, match="Row 1 is a int, not a mapping"):
        pb.build_prompt(iter([1, 2]))
    assert pb.format_db_results(iter(ROWS)) == TABLE


# ---------------------------------------------------------------------------
# The default counter: the real tokenizer near the budget
# ---------------------------------------------------------------------------


def test_the_default_counter_counts_near_the_budget_with_the_real_tokenizer():
    counter = token_count.Cl100kCounter()
    assert counter.load()
    rows = many_rows(5000)
    real = pb.build_prompt(rows, "{data}", max_tokens=2000, counter=counter)
    assert real.token_counter == "cl100k_base (tiktoken)"
    assert real.estimated_tokens == counter.count(real.text) <= 2000
    # The estimate errs high on such rows, so the real count fits more of them.
    assert real.rows_shown > build_estimated(rows, "{data}", max_tokens=2000).rows_shown
    small = pb.build_prompt(ROWS, "{data}", counter=counter)
    assert small.token_counter == "estimate" and small.estimated_tokens == pb.estimate_tokens(small.text)


@pytest.mark.parametrize("fmt", pb.FORMATS)
def test_real_budget_boundary_is_exact(fmt):
    counter = token_count.Cl100kCounter()
    rows = many_rows(200)
    full = pb.build_prompt(rows, "분석: {data}", data_format=fmt, max_tokens=BIG, counter=counter)
    tokens = counter.count(full.text)
    exact = pb.build_prompt(rows, "분석: {data}", data_format=fmt, max_tokens=tokens, counter=counter)
    assert exact.text == full.text and exact.estimated_tokens == tokens
    cut = pb.build_prompt(rows, "분석: {data}", data_format=fmt, max_tokens=tokens - 1, counter=counter)
    assert cut.truncated and counter.count(cut.text) <= tokens - 1


def test_the_system_prompt_is_counted_by_the_counter_in_use():
    counter = token_count.Cl100kCounter()
    rows = many_rows(5000)
    system = "당신은 꼼꼼한 데이터 분석가입니다. " * 200
    result = pb.build_prompt(rows, system_prompt=system, counter=counter)
    assert counter.count(result.text) + counter.count(system) + counter.count("\n\n") <= pb.default_token_budget()
    assert result.rows_shown < pb.build_prompt(rows, counter=counter).rows_shown


# ---------------------------------------------------------------------------
# CSV control characters
# ---------------------------------------------------------------------------


def test_csv_escapes_terminal_control_characters_visibly_and_reads_back():
    value = "bell\x07 esc\x1b[31mred\x1b[0m del\x7f nul\x00 back\\slash tab\tnew\nline"
    rows = [{"note\x1b": value, "n": 1}]
    result = pb.build_prompt(rows, "{data}", data_format="csv")
    for raw in "\x07\x1b\x7f\x00":
        assert raw not in result.text
    assert result.text == 'note\\x1b,n\n"bell\\x07 esc\\x1b[31mred\\x1b[0m del\\x7f nul\\x00 back\\\\slash tab\tnew\nline",1'
    assert parse_csv(result.text) == (["note\x1b", "n"], [[value, "1"]])

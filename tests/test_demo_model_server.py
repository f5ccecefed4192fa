"""demo_model_server.py: the whole chain on the laptop before the PC is ready, for each protocol."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import config
from conftest import REPO_ROOT, make_settings
from demo_model_server import DemoServer, demo_answer, describe_prompt
from demo_structured import schema_instance
from fake_server_base import free_port
from server_client import ServerClient
from test_pipeline import run  # noqa: F401  (the fixture: the command in-process)

PROTOCOLS = ["pc", "ollama", "openai"]


@pytest.mark.parametrize("stream_flag", ["--stream", "--no-stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_pipeline_runs_against_the_demo_for_each_protocol(run, protocol, stream_flag):
    with DemoServer(protocol, port=0, speed=0) as demo:
        result = run("--query", "SELECT name, city FROM customers ORDER BY id", stream_flag,
                     env={"API_BASE_URL": demo.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[demo] ") and "not from a model" in result.stdout
    assert "12 table rows" in result.stdout  # it says what it received
    stats = result.stderr.strip().splitlines()[-1]
    assert f"{protocol}:" in stats and "rows 12/12" in stats and "tokens in " in stats and "tok/s" in stats


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_detection_recognises_the_demo_and_check_passes(run, test_db_url, protocol):
    with DemoServer(protocol, port=0, speed=0) as demo:
        with ServerClient(make_settings(test_db_url, API_BASE_URL=demo.base_url)) as client:
            assert client.detect() == protocol
        check = run("--check", env={"API_BASE_URL": demo.base_url})
    assert check.returncode == 0, check.stdout
    server_line = next(line for line in check.stdout.splitlines() if demo.base_url in line)
    assert server_line.startswith("[ OK ]") and "ready" in server_line
    assert f"{protocol} (detected" in server_line and "model " in server_line


def test_json_stats_from_the_demo_are_the_servers_own(run):
    with DemoServer("ollama", port=0, speed=0) as demo:
        result = run("--query", "SELECT 1 AS x", "--json", "--stream", env={"API_BASE_URL": demo.base_url})
    doc = json.loads(result.stdout)
    stats = doc["stats"]
    assert doc["protocol"] == "ollama" and doc["model"] == "phi4"
    assert stats["generated_tokens"] == len(doc["answer"].split()) and stats["measured"] == []
    assert stats["generation_time"] is not None and stats["input_tokens"] > 0


def test_the_answer_says_what_it_received():
    prompt = "Rows:\n| a |\n|---|\n| 1 |\n| 2 |\n\n(showing 2 of 9 rows)"
    assert describe_prompt(prompt, None) == f"a prompt of {len(prompt)} characters, 2 of 9 rows"
    assert "3 table rows" in describe_prompt("| a |\n|---|\n| 1 |\n| 2 |\n| 3 |", "system")
    assert describe_prompt("| a |\n|---|\n| 1 |", None).endswith(", 1 table row")
    assert "a system prompt of 6 characters" in describe_prompt("x", "system")
    assert demo_answer("x").startswith("[demo]") and "PC_IP" in demo_answer("x")


def test_it_listens_on_loopback_by_default():
    with DemoServer("pc", port=0) as demo:
        assert demo.httpd.server_address[0] == "127.0.0.1"
        assert demo.base_url.startswith("http://127.0.0.1:")


def test_the_command_prints_the_setting_to_use_and_serves(run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "demo_model_server.py"), "--protocol", "openai",
                             "--port", str(port), "--speed", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8")
    try:
        banner = [proc.stdout.readline() for _ in range(4)]
        url = f"http://127.0.0.1:{port}"
        assert f"at {url}" in banner[0]
        assert any(f"API_BASE_URL={url}" in line for line in banner)
        assert any(f"--api-url {url}" in line for line in banner)
        result = run("--query", "SELECT 1 AS x", "--no-stream", env={"API_BASE_URL": url})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("[demo]") and "openai:phi4" in result.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_a_port_in_use_is_explained():
    with DemoServer("pc", port=0) as busy:
        port = busy.httpd.server_address[1]
        result = subprocess.run([sys.executable, str(REPO_ROOT / "demo_model_server.py"), "--port", str(port)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and f"--port {port + 1}" in result.stderr
    assert f"API_BASE_URL=http://127.0.0.1:{port + 1}" in result.stderr


@pytest.mark.parametrize("env", [{}, {"PC_IP": "192.168.0.XXX"}], ids=["unset", "placeholder"])
def test_an_unconfigured_pc_points_at_the_demo(run, env):
    result = run("--query", "SELECT 1", env=env)
    assert result.returncode == 2
    assert "python demo_model_server.py" in result.stderr and "API_BASE_URL=http://127.0.0.1:8000" in result.stderr
    with pytest.raises(config.ConfigError, match="PC_IP"):
        config.load_settings(env, environ={}).api_base_url()


# --- answers asked for as JSON (--schema) ---------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_readmes_schema_example_runs_against_the_demo(run, tmp_path, protocol):
    # The pc server is sent the schema in the prompt; Ollama as format, OpenAI-compatible as response_format.
    with DemoServer(protocol, port=0, speed=0) as demo:
        result = run("--per-row", "--query", "SELECT id, rating, title, body FROM reviews",
                     "--template-file", str(REPO_ROOT / "examples" / "templates" / "review_sentiment_per_row.txt"),
                     "--schema", str(REPO_ROOT / "examples" / "sentiment_schema.json"),
                     "--output", str(tmp_path / "sentiment.csv"), env={"API_BASE_URL": demo.base_url})
    assert result.returncode == 0, result.stderr
    assert "Rows: 20 ok, 0 failed" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "sentiment.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {tuple(sorted(r["parsed"])) for r in records if "status" in r} == {("score", "sentiment", "topics")}


@pytest.mark.parametrize(
    "schema",
    [
        json.loads((REPO_ROOT / "examples" / "sentiment_schema.json").read_text(encoding="utf-8")),
        {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 3},
                                          "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                                          "label": {"type": "string", "minLength": 10, "maxLength": 12},
                                          "maybe": {"type": ["null", "boolean"]}, "fixed": {"const": 7},
                                          "either": {"anyOf": [{"type": "number", "maximum": -5}, {"type": "string"}]}},
         "required": ["n", "tags", "label", "maybe", "fixed", "either"], "additionalProperties": False},
        {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 0},
    ],
    ids=["sentiment", "keywords", "empty-array"],
)
def test_the_demos_json_matches_the_schema(schema):
    import jsonschema

    jsonschema.validate(schema_instance(schema), schema)

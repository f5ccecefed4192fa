"""model_backend.PoolBackend: what long runs (per-row, map-reduce) see of the server pool."""

from __future__ import annotations

from fake_ollama_server import FakeOllamaServer
from fake_server_base import free_port
from model_backend import PoolBackend
from model_api_client import ModelServerPool
from model_clients import Sleeps, settings_for


def test_a_server_down_at_the_start_still_counts_in_the_default_concurrency():
    """A PC still booting when the run starts gets its share once it is back: the run's workers
    are sized for every configured server, while estimates use the servers ready now."""
    dead = f"http://127.0.0.1:{free_port()}#slots=2"
    with FakeOllamaServer() as live:
        pool = ModelServerPool(settings_for(f"{live.base_url}#slots=1,{dead}"), sleep=Sleeps())
        with pool:
            backend = PoolBackend(pool)
            assert backend.capacity == 3
            assert backend.ready_capacity == 1
            assert backend.generate("hello").text  # the live server answers meanwhile


def test_capacity_is_learned_once_from_a_health_check_with_gets_only():
    with FakeOllamaServer() as live:
        with ModelServerPool(settings_for(f"{live.base_url}#slots=4"), sleep=Sleeps()) as pool:
            backend = PoolBackend(pool)
            assert backend.capacity == backend.ready_capacity == 4
            assert backend.capacity == 4
        assert live.count("POST") == 0 and live.count("GET") > 0

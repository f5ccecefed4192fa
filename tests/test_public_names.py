"""The five modules users import keep every public name they had before the reshape."""

from __future__ import annotations

import importlib

import pytest

# Every public name of each module as it was before the code was split into smaller modules.
NAMES = {
    "config": [
        "Config", "LOG_LEVELS", "PROTOCOLS", "SECRET_NAMES", "Settings", "VARIABLES", "describe_settings",
        "get_settings", "is_placeholder", "load_settings", "mask_secrets", "mask_url_password",
    ],
    "db_connector": [
        "Database", "FETCH_BATCH", "Params", "QueryResult", "check_read_only_query", "close_pool",
        "connect_db", "execute_query", "first_keyword", "get_database", "logger", "release_db",
        "split_statements", "test_connection",
    ],
    "prompt_builder": [
        "DEFAULT_CONTEXT_TOKENS", "DEFAULT_MAX_CELL_CHARS", "DEFAULT_MAX_NEW_TOKENS",
        "DEFAULT_RESERVE_TOKENS", "ELLIPSIS", "FORMATS", "PLACEHOLDERS", "PromptResult", "build_prompt",
        "build_prompt_from_data", "check_template", "default_token_budget", "estimate_tokens",
        "format_db_results", "format_value", "load_template", "logger",
    ],
    "model_api_client": [
        "DETAIL_CHARS", "EXCERPT_CHARS", "HealthReport", "ModelAPIClient", "PROTOCOLS", "RETRY_STATUSES",
        "STATS_KEYS", "check_server_health", "clear_detection_cache", "get_default_client", "logger",
        "send_prompt", "stream_prompt",
    ],
    "db_to_model_pipeline": [
        "DEFAULT_FETCH_ROWS", "EPILOG", "ExitCode", "LOG_BACKUPS", "LOG_MAX_BYTES", "SecretMaskingFilter",
        "Terminated", "UsageError", "build_parser", "close_resources", "exit_code_for", "format_stats",
        "logger", "main", "run_checks", "run_pipeline", "setup_logging", "write_atomically",
    ],
}


@pytest.mark.parametrize("module", sorted(NAMES))
def test_every_public_name_is_still_there(module):
    loaded = importlib.import_module(module)
    assert [name for name in NAMES[module] if not hasattr(loaded, name)] == []

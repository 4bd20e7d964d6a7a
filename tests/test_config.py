"""Configuration: the original's variable names and defaults, fallbacks, booleans, and start-up errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import config
from conftest import ROOT

# The table: these names and defaults are fixed for the original's users.
ORIGINAL_DEFAULTS = [
    ("UPSTREAM_BASE_URL", "upstream_base_url", "https://openrouter.ai/api/v1"),
    ("UPSTREAM_API_KEY", "upstream_api_key", ""),
    ("UPSTREAM_TIMEOUT_SECONDS", "upstream_timeout_seconds", 180),
    ("HOST", "host", "0.0.0.0"),
    ("PORT", "port", 8000),
    ("CACHE_DB_PATH", "cache_db_path", "./code_model_cache.sqlite3"),
    ("CACHE_ENABLED", "cache_enabled", True),
    ("CACHE_TTL_SECONDS", "cache_ttl_seconds", 2592000),
    ("CACHE_MAX_INPUT_CHARS", "cache_max_input_chars", 120000),
    ("CACHE_MAX_RESPONSE_CHARS", "cache_max_response_chars", 240000),
    ("CACHE_MODEL_ALLOWLIST", "cache_model_allowlist", ()),
    ("CACHE_MODEL_DENYLIST", "cache_model_denylist", ()),
    ("CACHE_IGNORE_KEYS", "cache_ignore_keys", ()),
    ("INCLUDE_CACHE_METADATA", "include_cache_metadata", False),
    ("CACHE_ADMIN_TOKEN", "cache_admin_token", ""),
    ("OPENROUTER_HTTP_REFERER", "openrouter_http_referer", ""),
    ("OPENROUTER_X_TITLE", "openrouter_x_title", ""),
    ("CORS_ALLOW_ORIGIN", "cors_allow_origin", "*"),
]

# A value for each variable and what the setting becomes.
ORIGINAL_VALUES = [
    ("UPSTREAM_BASE_URL", "http://127.0.0.1:9/v1", "upstream_base_url", "http://127.0.0.1:9/v1"),
    ("UPSTREAM_API_KEY", "sk-upstream", "upstream_api_key", "sk-upstream"),
    ("UPSTREAM_TIMEOUT_SECONDS", "2.5", "upstream_timeout_seconds", 2.5),
    ("HOST", "127.0.0.1", "host", "127.0.0.1"),
    ("PORT", "9123", "port", 9123),
    ("CACHE_DB_PATH", "/tmp/x.sqlite3", "cache_db_path", "/tmp/x.sqlite3"),
    ("CACHE_ENABLED", "0", "cache_enabled", False),
    ("CACHE_TTL_SECONDS", "0", "cache_ttl_seconds", 0),
    ("CACHE_MAX_INPUT_CHARS", "10", "cache_max_input_chars", 10),
    ("CACHE_MAX_RESPONSE_CHARS", "20", "cache_max_response_chars", 20),
    ("CACHE_MODEL_ALLOWLIST", "openai/*, anthropic/claude-*", "cache_model_allowlist",
     ("openai/*", "anthropic/claude-*")),
    ("CACHE_MODEL_DENYLIST", "*:free", "cache_model_denylist", ("*:free",)),
    ("CACHE_IGNORE_KEYS", "user,,seed ", "cache_ignore_keys", ("user", "seed")),
    ("INCLUDE_CACHE_METADATA", "yes", "include_cache_metadata", True),
    ("CACHE_ADMIN_TOKEN", "admin-secret", "cache_admin_token", "admin-secret"),
    ("OPENROUTER_HTTP_REFERER", "https://example.test", "openrouter_http_referer", "https://example.test"),
    ("OPENROUTER_X_TITLE", "My Agent", "openrouter_x_title", "My Agent"),
    ("CORS_ALLOW_ORIGIN", "https://app.example", "cors_allow_origin", "https://app.example"),
]


@pytest.mark.parametrize("env, attribute, default", ORIGINAL_DEFAULTS, ids=[row[0] for row in ORIGINAL_DEFAULTS])
def test_load_settings__original_default(env, attribute, default):
    settings = config.load_settings({})
    assert getattr(settings, attribute) == default
    declared = {field.name: field.metadata["env"] for field in config.dataclasses.fields(config.Settings)}
    assert declared[attribute] == env


@pytest.mark.parametrize("env, raw, attribute, expected", ORIGINAL_VALUES, ids=[row[0] for row in ORIGINAL_VALUES])
def test_load_settings__reads_original_variable(env, raw, attribute, expected):
    assert getattr(config.load_settings({env: raw}), attribute) == expected


def test_load_settings__reads_os_environ_when_none_given(monkeypatch):
    monkeypatch.setenv("CACHE_TTL_SECONDS", "77")
    assert config.load_settings().cache_ttl_seconds == 77


@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("0", False), ("true", True), ("false", False), ("yes", True), ("no", False),
    ("on", True), ("off", False), ("TRUE", True), (" Off ", False), ("Yes", True),
])
def test_load_settings__boolean_words(raw, expected):
    assert config.load_settings({"CACHE_ENABLED": raw}).cache_enabled is expected
    assert config.load_settings({"INCLUDE_CACHE_METADATA": raw}).include_cache_metadata is expected


def test_load_settings__base_url_falls_back_to_openai_base_url():
    settings = config.load_settings({"OPENAI_BASE_URL": "http://127.0.0.1:5/v1/"})
    assert settings.upstream_base_url == "http://127.0.0.1:5/v1"


def test_load_settings__upstream_base_url_wins_over_fallback():
    settings = config.load_settings({"UPSTREAM_BASE_URL": "http://a.test/v1",
                                     "OPENAI_BASE_URL": "http://b.test/v1"})
    assert settings.upstream_base_url == "http://a.test/v1"


@pytest.mark.parametrize("raw", ["http://127.0.0.1:5/v1/", "http://127.0.0.1:5/v1//"])
def test_load_settings__trailing_slash_stripped(raw):
    assert config.load_settings({"UPSTREAM_BASE_URL": raw}).upstream_base_url == "http://127.0.0.1:5/v1"


@pytest.mark.parametrize("environ, expected", [
    ({"OPENROUTER_API_KEY": "or-key", "OPENAI_API_KEY": "oa-key"}, "or-key"),
    ({"OPENAI_API_KEY": "oa-key"}, "oa-key"),
    ({"UPSTREAM_API_KEY": "up-key", "OPENROUTER_API_KEY": "or-key", "OPENAI_API_KEY": "oa-key"}, "up-key"),
    ({"UPSTREAM_API_KEY": "", "OPENAI_API_KEY": "oa-key"}, "oa-key"),
    ({}, ""),
])
def test_load_settings__api_key_fallbacks(environ, expected):
    assert config.load_settings(environ).upstream_api_key == expected


@pytest.mark.parametrize("env, raw", [
    ("CACHE_TTL_SECONDS", "abc"),
    ("CACHE_TTL_SECONDS", "-1"),
    ("PORT", "eighty"),
    ("PORT", "70000"),
    ("UPSTREAM_TIMEOUT_SECONDS", "soon"),
    ("CACHE_ENABLED", "maybe"),
    ("CACHE_MAX_INPUT_CHARS", "1.5"),
])
def test_load_settings__bad_value_names_the_variable(env, raw):
    with pytest.raises(config.SettingsError) as caught:
        config.load_settings({env: raw})
    assert env in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_settings__overrides_win_and_settings_are_frozen():
    settings = config.load_settings({"CACHE_TTL_SECONDS": "abc"}, cache_ttl_seconds=5)
    assert settings.cache_ttl_seconds == 5
    with pytest.raises(config.dataclasses.FrozenInstanceError):
        settings.cache_ttl_seconds = 6  # type: ignore[misc]


def test_describe_settings__every_setting_has_env_default_and_help():
    rows = config.describe_settings()
    assert [row[0] for row in rows] == [f.metadata["env"] for f in config.dataclasses.fields(config.Settings)]
    for env, default, help_text in rows:
        assert env and isinstance(default, str) and help_text
    assert ("CACHE_ENABLED", "1") == rows[[r[0] for r in rows].index("CACHE_ENABLED")][:2]


def test_readme__documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [env for env, _, _ in config.describe_settings() if f"`{env}`" not in readme]
    assert missing == []


def test_readme__settings_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings-table:start")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- settings-table:end -->")
    assert readme[start:end] == config.settings_markdown_table(), "run `python config.py` and paste its table"


# --------------------------------------------------------------------------- real start-up


def _clean_env(**extra) -> dict:
    env = {name: value for name, value in os.environ.items()
           if name not in {f.metadata["env"] for f in config.dataclasses.fields(config.Settings)}
           and name not in {"OPENAI_BASE_URL", "OPENROUTER_API_KEY", "OPENAI_API_KEY"}}
    env.update(extra)
    return env


STARTUP_COMMANDS = {
    "python server.py": [sys.executable, "server.py"],
    "gunicorn": [str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "server:create_app()"],
}


def startup_error_line(command: list[str], tmp_path, **env: str) -> str:
    """Start the server with ``env``; it must stop with one line and no traceback: that line."""
    environment = _clean_env(PORT=str(_free_port()), HOST="127.0.0.1",
                             CACHE_DB_PATH=str(tmp_path / "c.sqlite3"), **env)
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.mark.parametrize("command", STARTUP_COMMANDS.values(), ids=STARTUP_COMMANDS.keys())
def test_startup__bad_ttl_stops_with_one_line_naming_it(command, tmp_path):
    assert "CACHE_TTL_SECONDS" in startup_error_line(command, tmp_path, CACHE_TTL_SECONDS="abc")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

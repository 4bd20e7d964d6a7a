"""Settings for Computer-Use Cache, read once from the environment.

Every setting is declared once below with its environment variable, default and a one-line
description. ``load_settings()`` builds the frozen ``Settings`` object that ``create_app`` takes;
nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
# How a server-held Anthropic key is sent: auto = x-api-key to *.anthropic.com, else bearer.
UPSTREAM_AUTH_STYLES = ("auto", "x-api-key", "bearer")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


class SettingsError(ValueError):
    """A configuration value cannot be used; the message names the variable."""


def parse_bool(text: str) -> bool:
    """Read a boolean the way the original server did: 1/0, true/false, yes/no, on/off."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _parse_non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text.strip())
        if value < 0:
            raise ValueError(f"must not be negative, got {text!r}")
        return value

    return parse


def _parse_within(kind: Callable[[str], Any], low: Any, high: Any, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text.strip())
        if not low <= value <= high:
            raise ValueError(f"must be {what}, got {text!r}")
        return value

    return parse


_parse_port = _parse_within(int, 0, 65535, "a port number 0-65535")


def _parse_str(text: str) -> str:
    return text.strip()


def _parse_upstream_auth(text: str) -> str:
    value = text.strip().lower()
    if value not in UPSTREAM_AUTH_STYLES:
        raise ValueError(f"must be one of {', '.join(UPSTREAM_AUTH_STYLES)}, got {text!r}")
    return value


def _parse_secret(text: str) -> str:
    value = text.strip()
    if value and len(value) < 16:
        raise ValueError("must be empty or at least 16 characters (use 32+ random characters)")
    return value


MATCH_MODES = ("exact", "near")


def parse_match(text: str) -> str:
    value = text.strip().lower()
    if value not in MATCH_MODES:
        raise ValueError(f"must be one of {', '.join(MATCH_MODES)}, got {text!r}")
    return value


parse_fraction = _parse_within(float, 0, 1, "a fraction from 0 to 1")


def parse_regions(text: str) -> tuple[tuple[float, float, float, float], ...]:
    """``x0,y0,x1,y1;...``: rectangles as fractions of an image's width and height."""
    regions = []
    for item in text.split(";"):
        if not item.strip():
            continue
        parts = item.split(",")
        if len(parts) != 4:
            raise ValueError(f"each region is x0,y0,x1,y1 (fractions), got {item.strip()!r}")
        x0, y0, x1, y1 = (parse_fraction(part) for part in parts)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"a region needs x0 < x1 and y0 < y1, got {item.strip()!r}")
        regions.append((x0, y0, x1, y1))
    return tuple(regions)


def parse_patterns(text: str) -> tuple[str, ...]:
    """Regular expressions as a JSON list of strings, or one per line; each must compile."""
    patterns: Any = None
    if text.lstrip().startswith("["):
        try:
            patterns = json.loads(text)
        except ValueError:
            patterns = None
        if not (isinstance(patterns, list) and all(isinstance(item, str) for item in patterns)):
            patterns = None
    if patterns is None:
        patterns = [line.strip() for line in text.splitlines() if line.strip()]
    check_patterns(patterns)
    return tuple(patterns)


def check_patterns(patterns: Any) -> None:
    for number, pattern in enumerate(patterns, start=1):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"pattern {number} ({pattern!r}) does not compile: {exc}") from None


CACHE_URL_SCHEMES = ("redis", "rediss", "unix")
_URL_PASSWORD = re.compile(r"(//[^:/@]*:)[^/]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``: what logs, errors and /cache/stats show."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url))


def _parse_cache_url(text: str) -> str:
    """Empty (SQLite at CACHE_DB_PATH), or a Redis URL the ``redis`` client can open."""
    value = text.strip()
    if not value:
        return value
    scheme, separator, rest = value.partition("://")
    if not separator or scheme.lower() not in CACHE_URL_SCHEMES:
        raise ValueError("must be empty (SQLite at CACHE_DB_PATH) or start with redis://, "
                         "rediss:// or unix://")
    location = rest.split("?", 1)[0]
    if scheme.lower() == "unix":
        if not location.startswith("/"):
            raise ValueError("unix:// needs an absolute socket path (unix:///run/redis.sock?db=0)")
        return value
    host_port, _, database = location.rpartition("@")[2].partition("/")
    if database and not database.isdigit():
        raise ValueError("the database after the host must be a number (redis://host:6379/0)")
    port = host_port.rpartition("]")[2].rpartition(":")
    if port[1] and not port[2].isdigit():
        raise ValueError("the port must be a number")
    return value


_PARSERS: dict[type | str, Callable[[str], Any]] = {
    "bool": parse_bool,
    "int": _parse_non_negative(int),
    "float": _parse_non_negative(float),
    "port": _parse_port,
    "str": _parse_str,
    "secret": _parse_secret,
    "list": parse_list,
    "match": parse_match,
    "fraction": parse_fraction,
    "regions": parse_regions,
    "patterns": parse_patterns,
    "url": _parse_cache_url,
    "auth": _parse_upstream_auth,
}


def setting(env: str, default: Any, kind: str, help: str) -> Any:
    """Declare one field: its environment variable, default, parser kind and help text."""
    return field(default=default, metadata={"env": env, "kind": kind, "help": help})


@dataclass(frozen=True)
class Settings:
    upstream_base_url: str = setting(
        "UPSTREAM_BASE_URL", OPENROUTER_BASE_URL, "str",
        "OpenAI-compatible base URL misses are forwarded to (falls back to OPENAI_BASE_URL).")
    upstream_api_key: str = setting(
        "UPSTREAM_API_KEY", "", "str",
        "Key sent upstream (falls back to OPENROUTER_API_KEY, then OPENAI_API_KEY); "
        "empty forwards each client's own bearer token.")
    upstream_timeout_seconds: float = setting(
        "UPSTREAM_TIMEOUT_SECONDS", 180.0, "float",
        "Total deadline for one upstream call, streams included.")
    host: str = setting("HOST", "0.0.0.0", "str", "Address the server listens on.")
    port: int = setting("PORT", 8000, "port", "Port the server listens on.")
    flask_debug: bool = setting(
        "FLASK_DEBUG", False, "bool", "Flask debug mode for `python server.py` (never in production).")
    cache_db_path: str = setting(
        "CACHE_DB_PATH", "./code_model_cache.sqlite3", "str", "SQLite database file of the cache.")
    cache_url: str = setting(
        "CACHE_URL", "", "url",
        "Empty = SQLite at CACHE_DB_PATH; redis://[user:password@]host:port/db, rediss:// (TLS) "
        "or unix:///path?db=N = one Redis shared by many instances (docs/many-instances.md).")
    cache_redis_prefix: str = setting(
        "CACHE_REDIS_PREFIX", "cuc:", "str",
        "Prefix of every Redis key the cache writes (so `clear` removes only ours).")
    cache_enabled: bool = setting(
        "CACHE_ENABLED", True, "bool",
        "Cache by default; 0 caches only requests that say \"cache\": true.")
    cache_ttl_seconds: int = setting(
        "CACHE_TTL_SECONDS", 2592000, "int",
        "Age after which an entry is a miss and is replaced; 0 = never expire.")
    cache_max_input_chars: int = setting(
        "CACHE_MAX_INPUT_CHARS", 120000, "int",
        "Requests whose canonical form is longer are answered but not cached (each inline image "
        "counts as the 64 characters of a digest).")
    cache_max_response_chars: int = setting(
        "CACHE_MAX_RESPONSE_CHARS", 240000, "int", "Responses longer than this are not stored.")
    cache_model_allowlist: tuple[str, ...] = setting(
        "CACHE_MODEL_ALLOWLIST", (), "list",
        "Comma-separated shell-style model patterns; when set, only matching models are cached.")
    cache_model_denylist: tuple[str, ...] = setting(
        "CACHE_MODEL_DENYLIST", (), "list",
        "Comma-separated shell-style model patterns that are never cached.")
    cache_ignore_keys: tuple[str, ...] = setting(
        "CACHE_IGNORE_KEYS", (), "list",
        "Comma-separated top-level body fields left out of the cache key.")
    cache_ignore_patterns: tuple[str, ...] = setting(
        "CACHE_IGNORE_PATTERNS", (), "patterns",
        "Regular expressions (a JSON list, or one per line) whose matches in message text are "
        "replaced by a fixed placeholder before the key is made (dates, step counters).")
    cache_match: str = setting(
        "CACHE_MATCH", "exact", "match",
        "exact, or near: a request that misses may be answered by an entry whose request differs "
        "only in tool-call ids and in screenshots that changed a little (X-Cache-Match per request).")
    cache_screenshot_tolerance: float = setting(
        "CACHE_SCREENSHOT_TOLERANCE", 0.002, "fraction",
        "Near matching: the share of a screenshot's area that may differ (0.002 = 0.2%).")
    cache_screenshot_ignore_regions: tuple[tuple[float, float, float, float], ...] = setting(
        "CACHE_SCREENSHOT_IGNORE_REGIONS", (), "regions",
        "Near matching: rectangles x0,y0,x1,y1;... (fractions of width and height) whose pixels "
        "never count, e.g. 0.88,0.95,1,1 for a bottom-right clock.")
    include_cache_metadata: bool = setting(
        "INCLUDE_CACHE_METADATA", False, "bool",
        "Add a code_model_cache object to JSON responses (never stored).")
    cache_admin_token: str = setting(
        "CACHE_ADMIN_TOKEN", "", "str", "When set, admin routes need it (X-Cache-Admin-Token or bearer).")
    openrouter_http_referer: str = setting(
        "OPENROUTER_HTTP_REFERER", "", "str", "HTTP-Referer sent upstream (else the client's).")
    openrouter_x_title: str = setting(
        "OPENROUTER_X_TITLE", "", "str", "X-Title sent upstream (else the client's).")
    cors_allow_origin: str = setting(
        "CORS_ALLOW_ORIGIN", "*", "str", "Access-Control-Allow-Origin on every response.")
    cache_coalesce: bool = setting(
        "CACHE_COALESCE", True, "bool",
        "Concurrent identical cacheable misses make one upstream call; the rest wait for it.")
    hit_flush_seconds: float = setting(
        "CACHE_HIT_FLUSH_SECONDS", 1.0, "float",
        "How often hit counters kept in memory are written to the database.")
    prometheus_multiproc_dir: str = setting(
        "PROMETHEUS_MULTIPROC_DIR", "", "str",
        "Directory where gunicorn workers share /metrics (gunicorn.conf.py sets one up); "
        "empty = one process.")
    cache_share_across_keys: bool = setting(
        "CACHE_SHARE_ACROSS_KEYS", False, "bool",
        "With no UPSTREAM_API_KEY, 1 lets clients with different API keys share one cache; "
        "by default each client key gets its own partition.")
    cache_key_secret: str = setting(
        "CACHE_KEY_SECRET", "", "secret",
        "Secret of the keyed hash that partitions the cache by client key; empty = generated "
        "once and kept in <CACHE_DB_PATH>.secret (0600).")
    max_request_bytes: int = setting(
        "MAX_REQUEST_BYTES", 52428800, "int",
        "Request bodies larger than this are refused with 413 before they are read (default 50 MiB).")
    proxy_api_keys: tuple[str, ...] = setting(
        "PROXY_API_KEYS", (), "list",
        "Comma-separated keys clients must send as their bearer token; needs UPSTREAM_API_KEY.")
    cache_max_entries: int = setting(
        "CACHE_MAX_ENTRIES", 0, "int",
        "Most entries kept; least recently used are evicted in the background (0 = unbounded).")
    cache_max_bytes: int = setting(
        "CACHE_MAX_BYTES", 0, "int",
        "Most bytes of stored request+response text; LRU eviction as above (0 = unbounded).")
    cache_purge_interval_seconds: float = setting(
        "CACHE_PURGE_INTERVAL_SECONDS", 60.0, "float",
        "How often each worker purges expired entries and returns free space to the file system "
        "(0 = only `flask cache purge`).")
    web_concurrency: int = setting(
        "WEB_CONCURRENCY", 2, "int", "gunicorn worker processes (production config).")
    gunicorn_threads: int = setting(
        "GUNICORN_THREADS", 256, "int",
        "Threads per gunicorn worker: requests (and streams) each worker holds at once.")
    gunicorn_timeout: int = setting(
        "GUNICORN_TIMEOUT", 60, "int",
        "Seconds a worker's main loop may stay silent before gunicorn restarts it "
        "(not a per-request limit: long streams are never cut by it).")
    anthropic_upstream_base_url: str = setting(
        "ANTHROPIC_UPSTREAM_BASE_URL", "", "str",
        "Where Anthropic Messages misses go (+ /messages); empty = UPSTREAM_BASE_URL (right for "
        "OpenRouter); https://api.anthropic.com/v1 for Anthropic itself.")
    anthropic_upstream_api_key: str = setting(
        "ANTHROPIC_UPSTREAM_API_KEY", "", "str",
        "Key sent with Messages misses (falls back to ANTHROPIC_API_KEY, then to UPSTREAM_API_KEY "
        "when Messages share its upstream); empty forwards each client's x-api-key or bearer.")
    anthropic_upstream_auth: str = setting(
        "ANTHROPIC_UPSTREAM_AUTH", "auto", "auth",
        "How the server's Messages key is sent: auto (x-api-key to *.anthropic.com, else "
        "Authorization: Bearer), x-api-key or bearer.")


_FALLBACKS = {
    "UPSTREAM_BASE_URL": ("OPENAI_BASE_URL",),
    "UPSTREAM_API_KEY": ("OPENROUTER_API_KEY", "OPENAI_API_KEY"),
    "ANTHROPIC_UPSTREAM_API_KEY": ("ANTHROPIC_API_KEY",),
}


def _raw_value(environ: Mapping[str, str], name: str) -> str | None:
    for candidate in (name, *_FALLBACKS.get(name, ())):
        value = environ.get(candidate)
        if value is not None and value.strip() != "":
            return value
    return None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment; a bad value raises SettingsError naming the variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(Settings):
        if spec.name in overrides:
            continue
        name = spec.metadata["env"]
        raw = _raw_value(environ, name)
        if raw is None:
            continue
        try:
            values[spec.name] = _PARSERS[spec.metadata["kind"]](raw)
        except ValueError as exc:
            shown = redact_url(raw) if spec.metadata["kind"] == "url" else raw
            raise SettingsError(f"{name}={shown!r} is not valid: {exc}") from None
    values.update(overrides)
    settings = Settings(**values)
    check_combinations(settings)
    return dataclasses.replace(
        settings, upstream_base_url=settings.upstream_base_url.rstrip("/") or OPENROUTER_BASE_URL,
        anthropic_upstream_base_url=settings.anthropic_upstream_base_url.rstrip("/"),
    )


def check_combinations(settings: Settings) -> None:
    """Settings that are valid alone but unsafe together fail start-up with one clear line."""
    try:  # settings given in code (tests) skip the parsers
        check_patterns(settings.cache_ignore_patterns)
    except ValueError as exc:
        raise SettingsError(f"CACHE_IGNORE_PATTERNS is not valid: {exc}") from None
    if settings.proxy_api_keys and not settings.upstream_api_key:
        # The client's bearer is then the proxy key: forwarding it upstream would leak it and fail.
        raise SettingsError(
            "PROXY_API_KEYS is set but UPSTREAM_API_KEY is not: with client keys the proxy must "
            "hold the upstream key itself (set UPSTREAM_API_KEY, OPENROUTER_API_KEY or OPENAI_API_KEY).")
    if (settings.proxy_api_keys and settings.anthropic_upstream_base_url
            and not settings.anthropic_upstream_api_key):
        raise SettingsError(
            "PROXY_API_KEYS and ANTHROPIC_UPSTREAM_BASE_URL are set but ANTHROPIC_UPSTREAM_API_KEY "
            "is not: the proxy must hold the Anthropic upstream key too (or ANTHROPIC_API_KEY).")


def describe_settings() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting: the README's configuration table."""
    rows = []
    for spec in dataclasses.fields(Settings):
        default = spec.default
        if isinstance(default, tuple):
            default = ",".join(default)
        elif isinstance(default, bool):
            default = int(default)
        rows.append((spec.metadata["env"], str(default), spec.metadata["help"]))
    return rows


def settings_markdown_table() -> str:
    """The README's configuration table, generated so it cannot drift from the code."""
    lines = ["| variable | default | what it does |", "|---|---|---|"]
    for env, default, help_text in describe_settings():
        shown = f"`{default}`" if default else "(empty)"
        lines.append(f"| `{env}` | {shown} | {help_text.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # `python config.py` prints the configuration table for README.md.
    print(settings_markdown_table(), end="")

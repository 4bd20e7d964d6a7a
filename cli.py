"""`flask --app server cache <command>`: look after the store from the command line.

Built on Flask's own CLI (click), so the commands see the same settings (environment) and the
same store as the server. JSON Lines export/import carries a warmed cache from one machine to
another: each line is one entry, with the stored request and response texts kept byte for byte
so the importing server answers exactly what the exporting one did.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import re
import sys
import time
from typing import IO, Any, Iterator

import click
from flask import current_app
from flask.cli import AppGroup

from apis import API_BY_MODE
from cache_policy import canonical_json, hash_canonical, valid_namespace
from cache_store import CacheStore, StoreError
from images import decode_prints, holds_image_references
from wire import lone_surrogate_path

EXTENSION = "computer_use_cache"
IMPORT_BATCH = 500
_KEY = re.compile(r"[0-9a-f]{64}")

cache_cli = AppGroup("cache", help="Inspect, trim, export and import the cache store.")


def _store() -> CacheStore:
    return current_app.extensions[EXTENSION].store


@contextlib.contextmanager
def _open_store() -> Iterator[CacheStore]:
    """The app's store, closed (hit counters flushed) when the command ends; errors as messages."""
    store = _store()
    try:
        yield store
    except StoreError as exc:
        raise click.ClickException(f"cache database unavailable: {exc}") from exc
    finally:
        store.close()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _progress(length: int, label: str):
    """A progress bar on stderr when stderr is a terminal; silent in scripts and pipes."""
    if sys.stderr.isatty():
        return click.progressbar(length=length, label=label, file=sys.stderr)
    return _NoProgress()


class _NoProgress:
    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def update(self, steps: int) -> None:
        return None


# -- commands ---------------------------------------------------------------------------------


@cache_cli.command("stats")
def stats_command() -> None:
    """Print the /cache/stats object."""
    with _open_store() as store:
        _echo_json(store.stats())


@cache_cli.command("clear")
@click.confirmation_option(prompt="Delete every cache entry?", help="Do not ask for confirmation.")
def clear_command() -> None:
    """Delete every entry."""
    with _open_store() as store:
        deleted = store.clear()
        store.vacuum()
    click.echo(f"deleted {deleted} entries")


@cache_cli.command("purge")
def purge_command() -> None:
    """Delete expired entries, evict over CACHE_MAX_ENTRIES/CACHE_MAX_BYTES, give space back."""
    with _open_store() as store:
        before = store.db_file_bytes()
        report = store.maintain()
        after = store.db_file_bytes()
    if report.converted_to_incremental:
        click.echo("database switched to incremental auto-vacuum")
    click.echo(f"purged {report.purged} expired, evicted {report.evicted}, "
               f"freed {report.vacuumed_pages} pages; database file {before} -> {after} bytes")


@cache_cli.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--model", default=None, help="Only entries of this model.")
@click.option("--namespace", default=None,
              help="Only entries of this X-Cache-Namespace ('' for the default namespace).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(limit: int, model: str | None, namespace: str | None, as_json: bool) -> None:
    """List entries, most recently stored first."""
    ns: Any = ... if namespace is None else (namespace or None)
    with _open_store() as store:
        items = store.list_entries(limit=limit, model=model, namespace=ns)
    now = time.time()
    for item in items:
        if as_json:
            click.echo(json.dumps(item, ensure_ascii=False))
            continue
        age = _age(now - item["created_at"])
        click.echo(f"{item['key']}  {item['mode']}  {item['model']}  ns={item['namespace'] or '-'}  "
                   f"hits={item['hits']}  {item['size']}B  age={age}  {item['prompt']}")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


@cache_cli.command("show")
@click.argument("key")
def show_command(key: str) -> None:
    """Print one entry: its facts, stored request and stored response."""
    with _open_store() as store:
        entry = store.entry(key)
    if entry is None:
        raise click.ClickException(f"no cache entry with key {key}")
    entry["request"] = _loads_or_text(entry.pop("request_json"))
    entry["response"] = _loads_or_text(entry.pop("response_json"))
    _echo_json(entry)


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@cache_cli.command("delete")
@click.argument("key")
def delete_command(key: str) -> None:
    """Delete one entry."""
    with _open_store() as store:
        deleted = store.delete(key)
    if not deleted:
        raise click.ClickException(f"no cache entry with key {key}")
    click.echo(f"deleted {key}")


@cache_cli.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
def export_command(file: str) -> None:
    """Write every entry to FILE as JSON Lines ('-' for stdout)."""
    with _open_store() as store:
        total = store.entry_count()
        if file == "-":
            written = _export(store, sys.stdout, total)
        else:
            # Written beside the target and renamed: a failed export never leaves half a file.
            partial = f"{file}.partial"
            with open(partial, "w", encoding="utf-8") as out:
                written = _export(store, out, total)
            os.replace(partial, file)
    click.echo(f"exported {written} entries", err=True)


def _export(store: CacheStore, out: IO[str], total: int) -> int:
    written = 0
    with _progress(total, "exporting") as bar:
        for record in store.export_rows():
            # ensure_ascii: any text SQLite holds (lone surrogates too) survives the file.
            out.write(json.dumps(record, sort_keys=True) + "\n")
            written += 1
            bar.update(1)
    return written


@cache_cli.command("import")
@click.argument("file", type=click.File("rb"))
def import_command(file: IO[bytes]) -> None:
    """Add the entries in a JSON Lines FILE ('-' for stdin) that are not already stored.

    Every line is checked; bad ones are reported by line number and skipped, the rest imported.
    An entry whose key is already stored is left exactly as it is, so importing twice changes
    nothing. Exit status 1 when any line was bad.
    """
    try:
        length = os.fstat(file.fileno()).st_size
    except (OSError, ValueError, AttributeError):
        length = 0
    imported = present = 0
    bad: list[str] = []
    batch: list[dict] = []
    with _open_store() as store, _progress(length, "importing") as bar:

        def write_batch() -> None:
            nonlocal imported, present
            inserted = store.insert_new(batch)
            imported += inserted
            present += len(batch) - inserted
            batch.clear()

        for number, raw in enumerate(file, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                batch.append(record_from_line(raw))
            except ValueError as exc:
                bad.append(f"line {number}: {exc}")
                continue
            if len(batch) >= IMPORT_BATCH:
                write_batch()
        if batch:
            write_batch()
    for message in bad:
        click.echo(message, err=True)
    click.echo(f"imported {imported}, already present {present}, invalid {len(bad)}", err=True)
    if bad:
        sys.exit(1)


# -- the export line format --------------------------------------------------------------------


def _number(record: dict, name: str, *, optional: bool = False) -> float | None:
    value = record.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    return float(value)


def _text(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def record_from_line(raw: bytes | str) -> dict:
    """One export line, checked; raises ValueError saying what is wrong.

    The key must be the hash of the stored request (and namespace), so a line can never make
    one request answer with another's response. A request whose inline images were stored as
    references (their digests) cannot be hashed again without the images: its key is taken as
    exported, so import such files only from a cache you trust.
    """
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    unstorable = lone_surrogate_path(record)
    if unstorable is not None:
        raise ValueError(f"{unstorable} holds a lone UTF-16 surrogate, which cannot be stored")
    key = _text(record, "key")
    if not _KEY.fullmatch(key):
        raise ValueError("key must be 64 lowercase hex characters")
    mode = record.get("mode")
    if mode not in API_BY_MODE:
        raise ValueError(f"mode must be one of {', '.join(repr(name) for name in API_BY_MODE)}")
    model = _text(record, "model")
    namespace = record.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not valid_namespace(namespace)):
        raise ValueError("namespace is not a valid X-Cache-Namespace")
    request_text = _text(record, "request_json")
    response_text = _text(record, "response_json")
    try:
        request = json.loads(request_text)
        response = json.loads(response_text)
    except ValueError:
        raise ValueError("request_json and response_json must hold JSON") from None
    if not isinstance(request, dict) or request.pop("cache_key", None) != key:
        raise ValueError("request_json must be an object carrying the same cache_key")
    unstorable = lone_surrogate_path(request)
    if unstorable is not None:  # cached before such requests were refused; never served now
        raise ValueError(f"request_json holds a lone UTF-16 surrogate at {unstorable}: such a "
                         "request is refused with a 400, so its entry would never be served")
    # A retrieval entry (a stored answer under its id, "<mode>.retrieve") names no model.
    retrieval = request.get("mode") == f"{mode}.retrieve"
    if not retrieval and (request.get("mode") != mode or str(request.get("model")) != model):
        raise ValueError("mode/model do not match request_json")
    canonical = canonical_json(request)
    if hash_canonical(canonical, namespace=namespace) != key and not holds_image_references(request):
        raise ValueError("key is not the hash of request_json (and namespace)")
    if not isinstance(response, dict):
        raise ValueError("response_json must hold a JSON object")
    created_at = _number(record, "created_at")
    updated_at = _number(record, "updated_at")
    near_group, near_fingerprints = _near_record(record)
    return {
        "key": key, "mode": mode, "model": model, "namespace": namespace,
        # The same text the proxy stores: the canonical request plus its key.
        "request_json": canonical[:-1] + f',"cache_key":"{key}"}}',
        "response_json": response_text,
        "created_at": created_at, "updated_at": max(updated_at or 0.0, created_at or 0.0),
        "expires_at": _number(record, "expires_at", optional=True),
        "near_group": near_group, "near_fingerprints": near_fingerprints,
    }


def _near_record(record: dict) -> tuple[str | None, bytes | None]:
    """The entry's near-matching record (near_group, near_fingerprints), when the line has one."""
    if record.get("near_group") is None and record.get("near_fingerprints") is None:
        return None, None
    group = record.get("near_group")
    if not isinstance(group, str) or not _KEY.fullmatch(group):
        raise ValueError("near_group must be 64 lowercase hex characters")
    try:
        fingerprints = base64.b64decode(record.get("near_fingerprints") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        fingerprints = b""
    if decode_prints(fingerprints) is None:
        raise ValueError("near_fingerprints must be the base64 of fingerprints this cache wrote")
    return group, fingerprints

"""`flask --app server cache ...`: run for real as a subprocess, and with click's runner for the
quick cases. Export from one proxy's database, import into a fresh one, and the same requests are
hits with the same bodies on a second proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cache_policy import canonical_json, hash_canonical
from cache_store import NewEntry
from conftest import ROOT, SETTING_VARIABLES
from helpers import chat_body, completion_body


def flask_cache(*args: str, db_path: str, **env: str) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items()
                   if name not in SETTING_VARIABLES and not name.startswith("FLASK_")}
    environment.update(CACHE_DB_PATH=db_path, UPSTREAM_BASE_URL="http://127.0.0.1:9", **env)
    return subprocess.run([sys.executable, "-m", "flask", "--app", "server", "cache", *args],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)


def warm(http, server) -> list[tuple[str, dict, dict]]:
    """A few requests a replayable agent run would make; returns (path, body, headers) of each."""
    calls = [
        ("/v1/chat/completions", chat_body("Open the login page"), {}),
        ("/v1/chat/completions", chat_body("Type the user name", temperature=0), {}),
        ("/v1/completions", completion_body("Say hello"), {}),
        ("/v1/chat/completions", chat_body("Open the login page"), {"X-Cache-Namespace": "run-1"}),
        ("/v1/chat/completions", chat_body("Ünïcode ✓ \U0001f600"), {}),
    ]
    for path, body, headers in calls:
        assert http.post(server.url + path, json=body, headers=headers).status_code == 200
    return calls


def test_cli__export_then_import_into_an_empty_database_reproduces_the_hits(
        start_proxy, fake_upstream, http, tmp_path):
    proxy_a = start_proxy()
    calls = warm(http, proxy_a)
    expected = [http.post(proxy_a.url + path, json=body, headers=headers) for path, body, headers in calls]
    assert {response.headers["X-Computer-Use-Cache"] for response in expected} == {"HIT"}
    upstream_calls = len(fake_upstream.requests)

    exported = flask_cache("export", str(tmp_path / "warm.jsonl"), db_path=proxy_a.store.path)
    assert exported.returncode == 0, exported.stderr
    assert "exported 5 entries" in exported.stderr
    fresh_db = str(tmp_path / "b" / "cache.sqlite3")
    imported = flask_cache("import", str(tmp_path / "warm.jsonl"), db_path=fresh_db)
    assert imported.returncode == 0, imported.stderr
    assert "imported 5, already present 0, invalid 0" in imported.stderr

    proxy_b = start_proxy(cache_db_path=fresh_db)
    for (path, body, headers), before in zip(calls, expected):
        after = http.post(proxy_b.url + path, json=body, headers=headers)
        assert after.headers["X-Computer-Use-Cache"] == "HIT"
        assert after.headers["X-Computer-Use-Cache-Key"] == before.headers["X-Computer-Use-Cache-Key"]
        assert after.content == before.content
    assert len(fake_upstream.requests) == upstream_calls


def good_lines(http, proxy, tmp_path) -> list[str]:
    warm(http, proxy)
    out = tmp_path / "good.jsonl"
    result = flask_cache("export", str(out), db_path=proxy.store.path)
    assert result.returncode == 0, result.stderr
    return out.read_text().splitlines()


def test_cli_import__reports_bad_lines_by_number_and_imports_the_rest(start_proxy, http, tmp_path):
    lines = good_lines(http, start_proxy(), tmp_path)
    tampered = json.loads(lines[1])
    tampered["request_json"] = tampered["request_json"].replace("Type", "Hack")
    missing = json.loads(lines[2])
    del missing["response_json"]
    mixed = [lines[0], "this is not json", json.dumps(tampered), json.dumps(missing), "",
             "[1, 2]", lines[3]]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(mixed) + "\n")
    target = str(tmp_path / "target.sqlite3")

    first = flask_cache("import", str(source), db_path=target)
    second = flask_cache("import", str(source), db_path=target)

    assert first.returncode == 1
    report = first.stderr.splitlines()
    assert [line.split(":")[0] for line in report if line.startswith("line ")] == [
        "line 2", "line 3", "line 4", "line 6"]
    assert "key is not the hash" in first.stderr and "response_json" in first.stderr
    assert "imported 2, already present 0, invalid 4" in first.stderr
    assert "imported 0, already present 2, invalid 4" in second.stderr  # idempotent
    listed = flask_cache("list", "--json", "--limit", "50", db_path=target)
    assert len(listed.stdout.splitlines()) == 2


def test_cli_import__never_overwrites_an_existing_entry(start_proxy, http, tmp_path):
    proxy = start_proxy()
    lines = good_lines(http, proxy, tmp_path)
    record = json.loads(lines[0])
    original = record["response_json"]
    record["response_json"] = json.dumps({"id": "chatcmpl-forged", "object": "chat.completion"})
    forged = tmp_path / "forged.jsonl"
    forged.write_text(json.dumps(record) + "\n")

    result = flask_cache("import", str(forged), db_path=proxy.store.path)

    assert result.returncode == 0
    assert "imported 0, already present 1, invalid 0" in result.stderr
    assert proxy.store.entry(record["key"])["response_json"] == original


def test_cli__nothing_is_opened_before_a_command_needs_it(tmp_path):
    db = tmp_path / "never.sqlite3"
    result = flask_cache("--help", db_path=str(db))
    assert result.returncode == 0 and "export" in result.stdout
    assert not db.exists()


def test_cli__stats_list_show_delete_as_subprocesses(proxy, http, tmp_path):
    warm(http, proxy)
    db = proxy.store.path
    proxy.store.flush()

    stats = json.loads(flask_cache("stats", db_path=db).stdout)
    listed = flask_cache("list", db_path=db).stdout.splitlines()
    key = listed[0].split()[0]
    shown = json.loads(flask_cache("show", key, db_path=db).stdout)
    deleted = flask_cache("delete", key, db_path=db)

    assert stats["entries"] == 5 and stats["db_path"] == db
    assert len(listed) == 5 and "ns=run-1" in " ".join(listed)
    assert shown["key"] == key and shown["request"]["cache_key"] == key and "response" in shown
    assert deleted.returncode == 0
    assert proxy.store.entry(key) is None and proxy.store.stats()["entries"] == 4


# -- click's runner: the quick cases --------------------------------------------------------------


@pytest.fixture
def runner(app):
    return app.test_cli_runner(mix_stderr=False) if _runner_mixes(app) else app.test_cli_runner()


def _runner_mixes(app) -> bool:
    import inspect

    from click.testing import CliRunner
    return "mix_stderr" in inspect.signature(CliRunner.__init__).parameters


def test_cli_runner__show_and_delete_unknown_keys_fail_cleanly(runner):
    shown = runner.invoke(args=["cache", "show", "f" * 64])
    deleted = runner.invoke(args=["cache", "delete", "f" * 64])
    assert shown.exit_code == 1 and "no cache entry" in shown.output
    assert deleted.exit_code == 1 and "no cache entry" in deleted.output


def test_cli_runner__clear_asks_first_and_purge_reports(runner, app):
    store = app.extensions["computer_use_cache"].store
    store.maintenance_seconds = 0  # no background pass: the purge below is the one that counts
    store.put(NewEntry("a" * 64, "chat", "m", '{"mode":"chat"}', '{"id":"x"}'), ttl_seconds=1)
    store.clock = lambda: 10**10  # far in the future: the entry has expired

    refused = runner.invoke(args=["cache", "clear"], input="n\n")
    purged = runner.invoke(args=["cache", "purge"])
    cleared = runner.invoke(args=["cache", "clear", "--yes"])

    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert purged.exit_code == 0 and "purged 1 expired, evicted 0" in purged.output
    assert cleared.exit_code == 0 and "deleted 0 entries" in cleared.output


def test_cli_runner__export_to_stdout_and_import_from_stdin(runner, app, tmp_path):

    store = app.extensions["computer_use_cache"].store
    canonical = canonical_json({"mode": "chat", "model": "m", "messages": []})
    key = hash_canonical(canonical)
    store.put(NewEntry(key, "chat", "m", canonical[:-1] + f',"cache_key":"{key}"}}', '{"id":"x"}'),
              ttl_seconds=30)
    exported = runner.invoke(args=["cache", "export", "-"])
    assert exported.exit_code == 0
    record = json.loads(exported.stdout.splitlines()[0])
    assert record["key"] == key and record["expires_at"] is not None

    runner.invoke(args=["cache", "clear", "--yes"])
    imported = runner.invoke(args=["cache", "import", "-"], input=exported.stdout)
    assert imported.exit_code == 0
    assert store.entry(key)["response_json"] == '{"id":"x"}'
    assert store.entry(key)["expires_at"] == pytest.approx(record["expires_at"])

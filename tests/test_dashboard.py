"""/dashboard in a real headless browser (Debian's chromium, installed by `make test`)."""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from previews import prompt_preview
from fake_upstream import chat_completion, json_reply
from helpers import chat_body

CHROMIUM = Path("/usr/bin/chromium")
CHAT = "/v1/chat/completions"


class ById(HTMLParser):
    """Text and attributes of every element with an id, from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict] = {}
        self.body: dict = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if tag in ("br", "meta", "input", "link", "img"):
            return
        element_id = attrs.get("id")
        if element_id:
            self.text[element_id] = ""
            self.attrs[element_id] = attrs
        self._open.append(element_id)

    def handle_endtag(self, tag):
        if self._open and tag not in ("br", "meta", "input", "link", "img"):
            self._open.pop()

    def handle_data(self, data):
        for element_id in self._open:
            if element_id:
                self.text[element_id] += data


def browse(tmp_path: Path, url: str, *extra: str) -> tuple[str, list[str]]:
    """Load url headless; (the DOM after 5 s of virtual time, the page's console lines)."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", "--dump-dom", *extra, url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def read_dom(dom: str) -> ById:
    parsed = ById()
    parsed.feed(dom)
    return parsed


def drive_traffic(proxy, fake_upstream, http) -> None:
    usage = {"prompt_tokens": 1500, "completion_tokens": 90, "total_tokens": 1590, "cost": 0.0042}
    fake_upstream.enqueue(json_reply(chat_completion("ok", usage=usage)),
                          json_reply(chat_completion("ok", usage=usage, model="test/model-b")))
    # Prompts carrying secrets are never stored (secret_scan); previews of older entries are
    # redacted as well, which the prompt_preview cases below check.
    prompt = "Log in as the admin user and open the billing settings page of the account"
    for _ in range(4):
        http.post(proxy.url + CHAT, json=chat_body(prompt))
    for _ in range(2):
        http.post(proxy.url + CHAT, json=chat_body("Click the blue Submit button", model="test/model-b"))
    http.post(proxy.url + CHAT, json=chat_body("Click"), headers={"X-Cache-Bypass": "1"})


def test_dashboard__page_is_self_contained(proxy, http):
    page = http.get(proxy.url + "/dashboard")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page.text, re.IGNORECASE)
    assert "http://" not in page.text and "https://" not in page.text
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_dashboard__browser_shows_the_figures_the_server_reports(start_proxy, fake_upstream, http, tmp_path):
    proxy = start_proxy()
    drive_traffic(proxy, fake_upstream, http)
    dom, console = browse(tmp_path, proxy.url + "/dashboard")
    stats = http.get(proxy.url + "/cache/stats").json()
    page = read_dom(dom)

    assert console == []  # no errors, no CSP violations, nothing logged at all
    assert page.body.get("data-ready") == "1"
    assert page.text["errors"] == ""
    assert stats["hit_rate"] == 0.6667 and stats["cost_saved_usd"] == pytest.approx(0.0042 * 4)
    assert page.text["hit-rate"] == f"{stats['hit_rate'] * 100:.1f}%"
    assert float(page.attrs["hit-rate"]["data-value"]) == stats["hit_rate"]
    assert page.text["cost-saved"] == f"${stats['cost_saved_usd']:.4f}"
    assert float(page.attrs["cost-saved"]["data-value"]) == stats["cost_saved_usd"]
    assert page.text["tokens-saved"] == f"{stats['tokens_saved']['total']:,}"
    assert float(page.attrs["time-saved"]["data-value"]) == stats["time_saved_seconds"]
    for element, field in (("entries", "entries"), ("hits-served", "hits_served"), ("misses", "misses"),
                           ("bypasses", "bypasses"), ("coalesced", "coalesced"), ("near-hits", "near_hits")):
        assert page.text[element] == f"{stats[field]:,}", element
    assert float(page.attrs["db-bytes"]["data-value"]) > 0

    top = page.text["top-entries"]
    assert "test/model-a" in top and "Log in as the admin user and open the billing" in top
    recent = page.text["recent"]
    assert recent.count("HIT") == 4 and recent.count("MISS") == 2 and recent.count("BYPASS") == 1
    assert "test/model-b" in page.text["by-model"]
    by_api = page.text["by-api"]  # the API, its hit rate, hits, misses, ..., unpriced hits
    chat = stats["by_api"]["chat"]
    assert by_api.startswith(f"chat{chat['hit_rate'] * 100:.1f}%{chat['hits']}{chat['misses']}")
    assert by_api.endswith("0")  # no unpriced hits: every answer carried usage.cost


def test_dashboard__admin_token_from_the_address_bar(start_proxy, fake_upstream, http, tmp_path):
    proxy = start_proxy(cache_admin_token="s3cret-admin")
    drive_traffic(proxy, fake_upstream, http)
    assert http.get(proxy.url + "/cache/activity").status_code == 401
    assert http.get(proxy.url + "/cache/activity",
                    headers={"X-Cache-Admin-Token": "s3cret-admin"}).status_code == 200

    locked = read_dom(browse(tmp_path, proxy.url + "/dashboard")[0])
    assert locked.text["status"] == "admin token needed" and "Log in" not in locked.text["top-entries"]
    assert "data-ready" not in locked.body

    unlocked = read_dom(browse(tmp_path / "second", proxy.url + "/dashboard?token=s3cret-admin")[0])
    assert unlocked.body.get("data-ready") == "1"
    assert unlocked.text["entries"] == "2" and "Log in as the admin user" in unlocked.text["top-entries"]


@pytest.mark.parametrize("request_json, preview", [
    ('{"messages":[{"role":"system","content":"sys"},{"role":"user","content":"Click  the\\nbutton"}]}',
     "Click the button"),
    ('{"messages":[{"role":"user","content":[{"type":"text","text":"Describe"},{"type":"image_url"}]}]}',
     "Describe"),
    ('{"prompt":"Say hello"}', "Say hello"),
    ('{"messages":[{"role":"user","content":"password: hunter22hunter and more"}]}', "[redacted] and more"),
    ('{"messages":[{"role":"user","content":"Authorization Bearer abc.def.ghi then"}]}',
     "Authorization [redacted] then"),
    ('{"prompt":"' + "word " * 30 + '"}', ("word " * 12).strip()[:59] + "\u2026"),
    ("not json", ""),
])
def test_dashboard__prompt_preview(request_json, preview):
    assert prompt_preview(request_json) == preview

"""`make bench`: a computer-use agent run recorded through the proxy and replayed (issue 11).

The agent takes 64 steps with a `computer` tool: each request carries the last 3 of its 1024x768
PNG screenshots as image_url data URLs (~300 KB) and echoes the tool calls the model made, whose
ids the upstream makes up at random. The fake upstream (tests/fake_upstream.py, in this process)
answers each step after 1 s. Run 1 records; run 2 replays, JSON and streamed, for:

* defaults (CACHE_MATCH=exact), the same screens;
* defaults, the screens of run 2 differing by their taskbar clock;
* CACHE_MATCH=near, the clock-perturbed screens.

Each proxy is the production server (gunicorn, gunicorn.conf.py) on a database of its own, with
the default settings unless named. A step is broken when its answer is not the tool call the
model gave for that step in run 1. Prints one table (the format of bench/run.py's) and stops.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import screens  # noqa: E402
from fake_upstream import FakeUpstream, chunks_from_completion, json_reply, sse_reply  # noqa: E402
import run  # noqa: E402
from run import Services  # noqa: E402

STEPS = 64
UPSTREAM_SECONDS = 1.0
RUN_CLOCK, PERTURBED_CLOCK = "10:41", "10:57"


@dataclass
class Run:
    """What one pass of the agent saw."""

    seconds: float = 0.0
    hits: int = 0
    near_hits: int = 0
    upstream_calls: int = 0
    broken: int = 0
    step_seconds: list[float] = field(default_factory=list)
    request_bytes: int = 0


class Agent:
    """A computer-use agent talking to one proxy, with its own fake upstream behind it."""

    def __init__(self, proxy_url: str, upstream: FakeUpstream, stream: bool):
        self.url = proxy_url + "/v1/chat/completions"
        self.upstream = upstream
        self.stream = stream
        self.session = requests.Session()

    def run(self, shots: list[str]) -> Run:
        """One pass: a step per screenshot."""
        result = Run()
        call_ids: list[str] = []
        began = time.perf_counter()
        for step in range(len(shots)):
            body = screens.agent_request(shots[:step + 1], call_ids, stream=self.stream)
            # The model's answer for this step, should the request reach it: a fresh random id.
            self.upstream.reset()
            answer = screens.tool_call_answer(step, "call_" + secrets.token_hex(12),
                                              "chatcmpl-" + secrets.token_hex(8))
            self.upstream.enqueue(sse_reply(chunks_from_completion(answer, include_usage=True))
                                  if self.stream else json_reply(answer))
            raw = json.dumps(body).encode()
            result.request_bytes = max(result.request_bytes, len(raw))
            sent = time.perf_counter()
            reply = self.session.post(self.url, data=raw, headers={"Content-Type": "application/json"},
                                      timeout=60)
            result.step_seconds.append(time.perf_counter() - sent)
            result.upstream_calls += len(self.upstream.calls())
            if reply.headers.get("X-Computer-Use-Cache") == "HIT":
                result.hits += 1
                result.near_hits += reply.headers.get("X-Computer-Use-Cache-Match") == "near"
            call = self._tool_call(reply)
            if call is None or json.loads(call["arguments"]) != screens.step_action(step):
                result.broken += 1
                call = {"id": f"call_broken_{step}"}
            call_ids.append(call["id"])
        result.seconds = time.perf_counter() - began
        return result

    def _tool_call(self, reply: requests.Response) -> dict | None:
        if reply.status_code != 200:
            return None
        if not self.stream:
            calls = reply.json()["choices"][0]["message"].get("tool_calls") or []
            return {"id": calls[0]["id"], "arguments": calls[0]["function"]["arguments"]} if calls else None
        call = None
        for line in reply.text.split("\n"):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                for delta in choice["delta"].get("tool_calls") or []:
                    call = call or {"id": "", "arguments": ""}
                    call["id"] += delta.get("id") or ""
                    call["arguments"] += (delta.get("function") or {}).get("arguments") or ""
        return call


def make_shots(clock: str, steps: int) -> list[str]:
    return [screens.data_url(screens.desktop(step, clock=clock)) for step in range(steps)]


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="agent steps per run")
    parser.add_argument("--upstream-seconds", type=float, default=UPSTREAM_SECONDS,
                        help="how long the fake upstream takes to answer")
    args = parser.parse_args(argv)
    began = time.monotonic()
    print(f"computer-use replay: {args.steps} steps, upstream {args.upstream_seconds:g} s, "
          "making screenshots", flush=True)
    shots, perturbed = make_shots(RUN_CLOCK, args.steps), make_shots(PERTURBED_CLOCK, args.steps)
    with tempfile.TemporaryDirectory(prefix="cuc-replay-") as tmp:
        services = Services(Path(tmp))
        upstreams = [FakeUpstream(default_delay=args.upstream_seconds).start() for _ in range(4)]
        try:
            scenarios(services, Path(tmp), upstreams, shots, perturbed)
        except Exception:
            for log in sorted(Path(tmp).glob("*.log")):  # what the servers said, before they go
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for upstream in upstreams:
                upstream.stop()
            services.stop_all()
    near_lookup_row()
    run.print_table()
    failures = sum(1 for *_, ok in run.ROWS if not ok)
    print(f"\nreplay bench finished in {time.monotonic() - began:.0f} s; "
          f"{'all targets met' if not failures else f'{failures} target(s) missed'}")
    return 0


def scenarios(services: Services, tmp: Path, upstreams: list[FakeUpstream], shots: list[str],
              perturbed: list[str]) -> None:
    """Record with four proxies, replay, and add a row per replay to the table (run.row)."""
    agents = {}
    for number, (mode, stream) in enumerate([("exact", False), ("exact", True), ("near", False),
                                             ("near", True)]):
        port, _ = services.gunicorn("server:create_app()", {
            "UPSTREAM_BASE_URL": upstreams[number].base_url, "UPSTREAM_API_KEY": "sk-bench",
            "CACHE_DB_PATH": str(tmp / f"{mode}-{stream}.sqlite3"), "CACHE_MATCH": mode})
        agents[mode, stream] = Agent(f"http://127.0.0.1:{port}", upstreams[number], stream)

    print("run 1: recording (4 agents side by side: defaults and near, JSON and streamed)", flush=True)
    with ThreadPoolExecutor(4) as pool:
        recorded = dict(zip(agents, pool.map(lambda agent: agent.run(shots), agents.values())))
    print("run 2: replaying the same screens, then the clock-perturbed screens", flush=True)
    replays = {}
    for stream in (False, True):  # one at a time: hit latencies are measured alone
        replays["defaults", stream] = agents["exact", stream].run(shots)
        replays["near, clock-perturbed", stream] = agents["near", stream].run(perturbed)
    with ThreadPoolExecutor(2) as pool:  # these miss and wait for the upstream: side by side
        slow = dict(zip((False, True), pool.map(lambda s: agents["exact", s].run(perturbed), (False, True))))
    for stream, result in slow.items():
        replays["defaults, clock-perturbed", stream] = result

    steps = len(shots)
    for (scenario, stream), replay in replays.items():
        mode = "near" if scenario.startswith("near") else "exact"
        first = recorded[mode, stream]
        saved = 1 - replay.seconds / first.seconds
        if scenario == "defaults":
            target = f"{steps}/{steps} hits, 0 upstream, >= 95% faster"
            ok = replay.hits == steps and replay.upstream_calls == 0 and saved >= 0.95
        elif scenario.startswith("near"):
            target = ">= 90% hits, 0 broken steps"
            ok = replay.hits >= 0.9 * steps and replay.broken == 0
        else:
            target = "none (what near matching is for)"
            ok = True
        run.row(f"run 2, {scenario}, {'streamed' if stream else 'JSON'}", target,
                f"{replay.hits}/{steps} hits ({replay.near_hits} near), {replay.upstream_calls} upstream, "
                f"{replay.broken} broken, {replay.seconds:.1f} s vs {first.seconds:.1f} s "
                f"({saved * 100:.1f}% saved), step p50 {p50(replay.step_seconds) * 1000:.1f} ms",
                None, ok)
    biggest = max(run.request_bytes for run in recorded.values())
    print(f"  largest request {biggest / 1024:.0f} KB; run-1 upstream calls "
          f"{', '.join(str(run.upstream_calls) for run in recorded.values())}", flush=True)


def near_lookup_row() -> None:
    """The cost of a near lookup in this process: three screenshots never seen before against
    16 candidates (the worst case: an agent resends its last screens, so a step usually has one
    new one)."""
    from cache_store import SQLiteStore
    from config import load_settings
    from near_match import CANDIDATES
    with tempfile.TemporaryDirectory(prefix="cuc-near-") as tmp:
        store = SQLiteStore(str(Path(tmp) / "near.sqlite3"), hit_flush_seconds=0)
        screens.store_near_candidates(store, CANDIDATES)
        lookups = sorted(screens.timed_near_lookup(store, load_settings({}), attempt)[0] for attempt in range(15))
        store.close()
    best, middle = lookups[0], lookups[len(lookups) // 2]
    run.row(f"near lookup, 3 new screenshots x {CANDIDATES} candidates", "<= 30 ms",
            f"best {best * 1000:.1f} ms, p50 {middle * 1000:.1f} ms", best / 0.030, best <= 0.030)


if __name__ == "__main__":
    sys.exit(main())

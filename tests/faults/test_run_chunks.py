"""`etl.run_chunks` against a real HTTP service (a server in the test) that fails
transiently (429 with Retry-After, 503, a request that times out) and permanently (400)
on chosen items and rate-limits its callers; and a `kill -9` of a run in the middle.

The server counts what it was sent: every good item must be delivered exactly once, the
bad ones must be dead letters, the waits between retries and the rate limit must hold,
and a rerun after the kill must not send again any item of a committed chunk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import etl
from tests.conftest import ROOT, execute, scalar

pytestmark = pytest.mark.timeout(180)

# The function's HTTP timeout: long enough that no answer of a loaded machine misses it
# (a timed-out request the server did take would be sent twice); a "timeout" answer
# takes longer.
CLIENT_TIMEOUT = 1.0


@dataclass
class Service:
    """What the server was asked and did; ``plan[id]`` is the answers to give, in turn."""

    plan: dict[int, list[str]] = field(default_factory=dict)
    per_second: int = 1000  # more requests than this in one second get 429 (rate limited)
    delay: float = 0.0  # every request takes this long
    attempts: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    delivered: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    times: list[float] = field(default_factory=list)
    throttled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, item: int) -> str:
        with self.lock:
            now = time.monotonic()
            self.times.append(now)
            self.attempts[item].append(now)
            if sum(1 for t in self.times if t > now - 1.0) > self.per_second:
                self.throttled += 1
                return "429"
            planned = self.plan.get(item, [])
            n = len(self.attempts[item])
            return planned[n - 1] if n <= len(planned) else "200"


@pytest.fixture
def service() -> Iterator[tuple[Service, str]]:
    svc = Service()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            item = int(self.path.rsplit("/", 1)[1])
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if svc.delay:
                time.sleep(svc.delay)
            how = svc.answer(item)
            if how == "timeout":
                time.sleep(CLIENT_TIMEOUT * 2)  # the client has given up: not delivered
                how = "504"
            if how == "200":
                with svc.lock:
                    svc.delivered[item] += 1
                body = json.dumps({"remote_id": f"r-{item}"}).encode()
            else:
                body = json.dumps({"error": how}).encode()
            self.send_response(int(how))
            if how == "429":
                self.send_header("Retry-After", "0.4")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield svc, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


CLIENT = '''
import json, socket, sys, urllib.error, urllib.request

BASE = sys.argv[1] if __name__ == "__main__" else None


class RateLimited(Exception):
    def __init__(self, retry_after):
        super().__init__(f"429, retry after {retry_after}s")
        self.retry_after = retry_after


class Unavailable(Exception):
    pass


class Rejected(Exception):
    pass


def push(row, base=None):
    req = urllib.request.Request(f"{base or BASE}/items/{row['id']}", method="POST",
                                 data=json.dumps(row, default=str).encode())
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_SECONDS) as answer:
            return {"remote_id": json.loads(answer.read())["remote_id"]}
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            raise RateLimited(float(exc.headers["Retry-After"])) from None
        if exc.code in (503, 504):
            raise Unavailable(f"{exc.code}") from None
        raise Rejected(f"{exc.code}: {exc.read().decode()}") from None
    except (TimeoutError, socket.timeout) as exc:
        raise TimeoutError("no answer in time") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise TimeoutError("no answer in time") from exc
        raise


if __name__ == "__main__":
    import etl

    url, job = sys.argv[2], sys.argv[3]
    result = etl.run_chunks(
        source=etl.Query(url, "select id, name from products", key="id"), fn=push, job=job,
        chunk_size=10, transient=(TimeoutError, RateLimited, Unavailable), retries=5,
        retry_base=0.05)
    sys.exit(result.exit_code)
'''.replace("TIMEOUT_SECONDS", repr(CLIENT_TIMEOUT))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    path = tmp_path / "client.py"
    path.write_text(CLIENT)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        module = importlib.import_module("client")
        importlib.reload(module)
        yield path, module
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("client", None)


def _products(url: str, n: int) -> None:
    execute(url, "CREATE TABLE products (id int PRIMARY KEY, name text);"
                 f"INSERT INTO products SELECT g, 'product ' || g FROM generate_series(1, {n}) g;"
                 "CREATE TABLE product_sync (id int PRIMARY KEY, remote_id text)")


def test_good_items_once_bad_ones_dead_letters_retries_waited_and_rate_kept(
        src: str, service: tuple[Service, str], client: tuple[Path, object]) -> None:
    svc, base = service
    _, mod = client
    _products(src, 60)
    svc.plan = {5: ["429", "429", "200"], 10: ["503", "200"], 15: ["timeout", "200"],
                20: ["400"], 33: ["400"]}
    svc.per_second = 15  # the service's own limit; the job keeps under it
    result = etl.run_chunks(
        source=etl.Query(src, "select id, name from products", key="id"),
        fn=lambda row: mod.push(row, base), job="sync-products", chunk_size=10, max_rate=12,
        transient=(TimeoutError, mod.RateLimited, mod.Unavailable), retries=5,
        retry_base=0.05, results_table="product_sync")
    assert result.status is etl.Status.COMPLETED_WITH_ERRORS and result.exit_code == 3
    assert result.succeeded == 58 and result.failed == 2 and result.processed == 60
    good = [i for i in range(1, 61) if i not in (20, 33)]
    assert {i: svc.delivered[i] for i in good} == dict.fromkeys(good, 1)
    assert svc.delivered[20] == svc.delivered[33] == 0
    assert len(svc.attempts[20]) == len(svc.attempts[33]) == 1  # permanent: never retried
    assert [len(svc.attempts[i]) for i in (5, 10, 15)] == [3, 2, 2]
    gaps = [b - a for a, b in zip(svc.attempts[5], svc.attempts[5][1:], strict=False)]
    assert all(g >= 0.4 for g in gaps), gaps  # the 429's Retry-After was waited
    assert result.metadata["item_retries"] == 4
    assert result.metadata["item_retries_by_reason"] == {"RateLimited": 2, "Unavailable": 1,
                                                         "TimeoutError": 1}
    assert svc.throttled == 0  # never faster than the service allows
    span = svc.times[-1] - svc.times[0]
    assert (len(svc.times) - 1) / span <= 12 * 1.1
    letters = etl.list_dead_letters("sync-products", state=src)
    assert sorted((d["item_key"], d["error_type"]) for d in letters) == [([20], "Rejected"),
                                                                          ([33], "Rejected")]
    assert all("400" in d["error_message"] for d in letters)
    assert scalar(src, "SELECT count(*) FROM product_sync") == 58
    assert scalar(src, "SELECT remote_id FROM product_sync WHERE id = 15") == "r-15"


def test_batches_are_halved_down_to_the_failing_item(src: str) -> None:
    _products(src, 40)
    seen: list[list[int]] = []

    def send(rows: list[dict]) -> list[dict]:
        ids = [r["id"] for r in rows]
        seen.append(ids)
        if 13 in ids:
            raise ValueError("item 13 is refused")
        return [{"remote_id": f"ok-{i}"} for i in ids]

    result = etl.run_chunks(source=etl.Query(src, table="products"), fn=send, job="batches",
                            batch=True, chunk_size=16, results_table="product_sync")
    assert result.status is etl.Status.COMPLETED_WITH_ERRORS
    assert result.succeeded == 39 and [e.item_identifier for e in result.errors] == ["[13]"]
    assert scalar(src, "SELECT count(*) FROM product_sync WHERE id <> 13") == 39
    # the failing chunk of 16 was called, then its halves, down to 13 alone
    assert [13] in seen and [9, 10, 11, 12, 13, 14, 15, 16] in seen


def test_a_transient_failure_that_outlasts_its_retries_stops_and_resumes_there(
        src: str, service: tuple[Service, str], client: tuple[Path, object]) -> None:
    svc, base = service
    _, mod = client
    _products(src, 30)
    svc.plan = {17: ["503"] * 3}
    args = dict(source=etl.Query(src, "select id, name from products", key="id"),
                fn=lambda row: mod.push(row, base), job="flaky", chunk_size=10,
                transient=(mod.Unavailable,), retries=2, retry_base=0.01)
    first = etl.run_chunks(**args)  # type: ignore[arg-type]
    assert first.status is etl.Status.FAILED and "still failed after 3 attempt(s)" in \
        first.message
    assert sorted(svc.delivered) == list(range(1, 17))  # the items before 17 committed
    again = etl.run_chunks(**args)  # type: ignore[arg-type]
    assert again.ok and again.succeeded == 30
    assert all(svc.delivered[i] == 1 for i in range(1, 31))


def test_kill_9_then_resume_never_resends_a_committed_item(
        src: str, service: tuple[Service, str], client: tuple[Path, object]) -> None:
    svc, base = service
    script, _ = client
    _products(src, 200)
    svc.delay = 0.01
    proc = subprocess.Popen([sys.executable, str(script), base, src, "kill-me"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while sum(svc.delivered.values()) < 85 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    committed = json.loads(scalar(src, "SELECT last_key::text FROM etl.checkpoints "
                                       "WHERE job_id = 'kill-me'"))[0]
    sent_before = dict(svc.delivered)
    assert 0 < committed < max(sent_before)  # killed in the middle of a chunk
    rerun = subprocess.run([sys.executable, str(script), base, src, "kill-me"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert all(svc.delivered[i] >= 1 for i in range(1, 201))
    for i in range(1, 201):
        if i <= committed or i > max(sent_before):
            assert svc.delivered[i] == 1, (i, committed, svc.attempts[i])
    twice = [i for i in range(1, 201) if svc.delivered[i] > 1]
    assert len(twice) <= 10 and all(committed < i <= committed + 10 for i in twice)
    stale = scalar(src, "SELECT count(*) FROM etl.runs WHERE job_id = 'kill-me' "
                        "AND status = 'failed'")
    assert stale == 1  # the killed run, closed by the rerun

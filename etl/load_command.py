"""``etl.load(...)``: check the options, resolve the files, plan and run the load under the
job's lock (the CLI's `etl load` calls exactly this)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import options as opt
from .errors import UsageError
from .model import Mode, TableName
from .report import Result
from .retry import DEFAULT_RETRIES, DEFAULT_RETRY_MAX_WAIT_SECONDS
from .runner import DEFAULT_CHUNK_SECONDS, StopFlag, stop_on_signals
from .sources.csv_rows import COMPRESSIONS
from .state.schema import DEFAULT_SCHEMA
from .table_copy import DEFAULT_LOCK_TIMEOUT_SECONDS
from .thresholds import DEFAULT_MAX_ERROR_RATE, ErrorLimits
from .urls import DbUrl, parse

if TYPE_CHECKING:
    from .progress import ProgressOption

# The format of a file named so (after a compression suffix).
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".ndjson": "ndjson",
                   ".jsonl": "ndjson", ".json": "ndjson", ".parquet": "parquet",
                   ".pq": "parquet"}
_FORMAT_NAMES = {"csv": "csv", "ndjson": "ndjson", "jsonl": "ndjson", "json": "ndjson",
                 "parquet": "parquet"}


def files_of(patterns: str | Path | list[str | Path] | tuple[str | Path, ...]) -> tuple[Path, ...]:
    """The files named, globs expanded (sorted), in the order given; none twice."""
    items = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    if not items:
        raise UsageError("give at least one FILE to load")
    out: list[Path] = []
    for item in items:
        text = str(item)
        found = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not found:
            raise UsageError(f"{text}: no file matches")
        out.extend(Path(f) for f in found if Path(f) not in out)
    return tuple(out)


def format_of(files: tuple[Path, ...], given: str | None) -> str:
    """--format, else the files' extension (a compression suffix looked through): csv,
    ndjson or parquet."""
    if given:
        fmt = _FORMAT_NAMES.get(given.lower())
        if fmt is None:
            raise UsageError(f"--format {given!r}: valid formats are csv, ndjson (or jsonl) "
                             "and parquet")
        return fmt
    kinds = set()
    for f in files:
        suffixes = [s.lower() for s in f.suffixes]
        while suffixes and suffixes[-1] in COMPRESSIONS:
            suffixes.pop()
        last = suffixes[-1] if suffixes else ""
        kinds.add(_SUFFIX_FORMATS.get(last, last.lstrip(".") or "?"))
    if len(kinds) != 1 or not kinds <= set(_FORMAT_NAMES.values()):
        raise UsageError(f"cannot tell the format of {', '.join(map(str, files))} from their "
                         "names; give --format csv, ndjson or parquet")
    return kinds.pop()


DATE_ORDERS = ("DMY", "MDY", "YMD")


def date_order_of(value: str | None) -> str | None:
    """--date-format: the order of a date's day, month and year (PostgreSQL's DateStyle)."""
    if value is None:
        return None
    order = value.strip().upper()
    if order not in DATE_ORDERS:
        raise UsageError(f"--date-format {value!r}: give the order of a date's fields, one of "
                         f"{', '.join(DATE_ORDERS)} (05/01/2024 is 5 January with DMY, "
                         "1 May with MDY); ISO dates and month names load with any")
    return order


def load(files: str | Path | list[str | Path], *, table: str,
         target: str | DbUrl | None = None, format: str | None = None,  # noqa: A002
         mode: str | Mode = Mode.APPEND, delimiter: str = ",", quote: str = '"',
         escape: str | None = None, header: bool = True, null: str = "",
         encoding: str = "UTF8", skip_lines: int = 0, date_format: str | None = None,
         columns: str | list[str] | None = None, rejects: str | Path | None = None,
         job: str | None = None, state: str | DbUrl | None = None,
         state_schema: str = DEFAULT_SCHEMA, chunk_size: int | str | None = "auto",
         chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
         min_chunk: int | None = None, max_chunk: int | None = None,
         max_rate: float | None = None,
         sleep: float | None = None, max_runtime: str | float | None = None,
         retries: int = DEFAULT_RETRIES,
         retry_max_wait: str | float = DEFAULT_RETRY_MAX_WAIT_SECONDS,
         lock_timeout: str | float | None = DEFAULT_LOCK_TIMEOUT_SECONDS,
         max_errors: int | None = None, max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE,
         dry_run: bool = False, restart: bool = False, report: str | Path | None = None,
         progress: ProgressOption = False, stop: StopFlag | None = None) -> Result:
    """Load CSV, NDJSON or Parquet ``files`` (paths or globs) into ``table`` of ``target``
    (PostgreSQL, MySQL/MariaDB or SQLite), in resumable chunks. PostgreSQL parses and
    converts every value itself; into MySQL/MariaDB and SQLite, etl does it in Python (see
    the end).

    ``format`` is ``csv``, ``ndjson`` (``jsonl``) or ``parquet``; by default the files'
    extension says (.csv/.tsv/.txt, .ndjson/.jsonl/.json, .parquet/.pq; a text file's
    .gz/.zst/.bz2 is read as it is).

    CSV: PostgreSQL's own CSV COPY. ``delimiter``, ``quote``, ``escape``, ``null`` (the
    unquoted text that means NULL; default: an unquoted empty field), ``encoding`` (the
    files', e.g. ``LATIN1``), ``header`` and ``skip_lines`` say how the files are written
    (CSV only: another format refuses them); the columns are ``columns``, else the
    header's names, else the table's columns in order.

    ``date_format`` (``DMY``, ``MDY`` or ``YMD``) says in which order the fields of a
    date such as ``05/01/2024`` are (default: ISO and month first, as PostgreSQL reads
    them); a year of four digits, a month name and ISO dates read the same either way,
    and ``05.01.2024``, ``5-Jan-2024``, ``20240105`` or ``January 5, 2024`` all load.

    NDJSON (one JSON object a line, blank lines skipped) and Parquet (streamed in record
    batches, each row written as a JSON object): the objects are COPYed into a staging
    table and PostgreSQL converts each column from the key of its name — the text of a
    JSON string, of a number or a boolean; a JSON array into an array column; a nested
    object or array as its JSON text; for a json/jsonb column a string holding JSON text
    is parsed. A missing key or ``null`` is NULL; keys that are not columns are ignored.
    The columns are ``columns``, else a Parquet file's own, else (NDJSON) the table's.

    ``mode`` is ``append``, ``replace`` (the table is emptied once, at the start of a fresh
    load), ``upsert`` or ``ignore`` (on a primary key or unique index among the loaded
    columns; the last row of a key in a statement wins). Rows PostgreSQL refuses become
    dead letters (file, line — a Parquet file's row —, raw text, error) and lines of
    ``rejects`` (NDJSON), and count as failed; ``max_errors``/``max_error_rate`` stop the run.
    The checkpoint (file, byte and line; a Parquet file's row) commits with each chunk in
    ``target`` — which is the state store — so a rerun resumes exactly; a file changed
    since is refused unless ``restart``. ``dry_run`` checks the files, the table and the
    columns and prints the SQL of each statement, writing nothing. Pacing, retries,
    ``report``, ``progress`` and ``stop`` are as for :func:`etl.copy`.

    MySQL/MariaDB (``mysql+pymysql://…``) and SQLite (``sqlite:///path.db``) targets
    (``etl.load_sql``): the same options, modes and guarantees. CSV fields are split as
    PostgreSQL's CSV COPY splits them (``encoding`` may also be any Python codec name) and
    every value is converted in Python to its column's type (integers range-checked,
    decimals rounded to the scale and checked against the precision, booleans, ISO 8601
    dates and timestamps — aware ones converted to UTC —, text against varchar(n)/char(n),
    ``\\x`` hex bytes, json validated): a value that does not convert makes its row a dead
    letter naming the column and the value; rows the database refuses (NOT NULL, CHECK,
    foreign keys — enforced on SQLite too —, a duplicate key in append, a value too long)
    are isolated by bisection. The state store is ``state`` (PostgreSQL; default: the
    embedded one); the exact position is kept in the target itself, in table
    ``etl_load_checkpoints`` (with the chunk's dead letters in ``etl_load_rejects`` until
    the state store has them), written in each chunk's transaction. The default job name
    is ``load:TABLE@DATABASE``.
    """
    from . import api, load_formats, load_job, pg
    from .jobrun import JobRun
    from .progress import progress_for

    paths = files_of(files)
    fmt = format_of(paths, format)
    tgt = api.resolve_url(target)
    date_order = date_order_of(date_format)
    if not tgt.is_postgres:  # MySQL/MariaDB and SQLite: etl.load_sql
        return _load_sql(paths, fmt, tgt, table=table, mode=mode, columns=columns,
                         rejects=rejects, job=job, state=state, state_schema=state_schema,
                         date_order=date_order,
                         pacing=opt.pacing(chunk_size, chunk_seconds, max_rate, sleep,
                                           max_runtime, min_chunk=min_chunk,
                                           max_chunk=max_chunk),
                         retry=opt.retry_policy(retries, retry_max_wait),
                         limits=ErrorLimits(max_errors=max_errors,
                                            max_error_rate=max_error_rate),
                         lock_timeout=opt.parse_duration(lock_timeout, "--lock-timeout"),
                         dry_run=dry_run, restart=restart, report=report, progress=progress,
                         stop=stop, csv_options=dict(delimiter=delimiter, quote=quote,
                                                     escape=escape, header=header, null=null,
                                                     encoding=encoding,
                                                     skip_lines=skip_lines))
    if state and not parse(state).same_database(tgt):
        raise UsageError("--state: a load keeps its checkpoint in the target database (in each "
                         "chunk's transaction, so a rerun resumes at the exact row); leave "
                         "--state out or name the target database")
    name = TableName.parse(table)
    csv = load_formats.CsvOptions(delimiter=delimiter, quote=quote, escape=escape, header=header,
                                  null=null, encoding=encoding, skip_lines=skip_lines)
    load_formats.file_format(fmt, csv)  # CSV options with another format: refused here
    spec = load_job.LoadSpec(
        target=tgt, table=name, files=paths, job_id=job or f"load:{name}",
        mode=opt.parse_mode(mode), format=fmt, csv=csv,
        columns=opt.parse_names(columns, "--columns"),
        rejects=Path(rejects) if rejects else None, restart=restart,
        pacing=opt.pacing(chunk_size, chunk_seconds, max_rate, sleep, max_runtime,
                       min_chunk=min_chunk, max_chunk=max_chunk),
        retry=opt.retry_policy(retries, retry_max_wait),
        limits=ErrorLimits(max_errors=max_errors, max_error_rate=max_error_rate),
        lock_timeout=opt.parse_duration(lock_timeout, "--lock-timeout"),
        state_schema=state_schema, date_order=date_order)
    if report:
        opt.check_report_path(report)
    if rejects:
        Path(rejects).parent.mkdir(parents=True, exist_ok=True)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    with stop_on_signals(stop):
        conn = pg.connect(tgt, "target", autocommit=True,
                          settings=spec.session_settings)
        try:
            plan = load_job.make_plan(spec, conn)
            if dry_run:
                return load_job.dry_run(plan)
            with JobRun(tgt, spec.job_id, "load", spec.args(), schema=state_schema) as run:
                result = load_job.execute(plan, run, conn, progress=prog, stop=stop,
                                          report_path=str(report) if report else None)
        finally:
            conn.close()
    if report:
        result.write(report)
    return result


def _load_sql(paths: tuple[Path, ...], fmt: str, tgt: DbUrl, *, csv_options: dict[str, Any],
              mode: str | Mode, columns: str | list[str] | None, rejects: str | Path | None,
              **kw: Any) -> Result:
    """The load into a MySQL/MariaDB or SQLite target (``etl.load_sql``)."""
    from . import load_formats, load_sql

    csv = load_formats.CsvOptions(**csv_options)
    load_formats.file_format(fmt, csv)  # CSV options with another format: refused here
    return load_sql.load(paths, fmt, tgt, csv=csv, mode=opt.parse_mode(mode),
                         columns=opt.parse_names(columns, "--columns"),
                         rejects=Path(rejects) if rejects else None, **kw)

"""The public Python API: `etl.__all__` is what docs/library.md lists, every option of every
public function is exercised somewhere in the tests (or in the documentation examples,
which run as tests), and `import etl` loads none of the heavy libraries."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import etl

ROOT = Path(__file__).resolve().parents[2]
LIBRARY_PAGE = ROOT / "docs" / "library.md"
# the command behind each function, for options exercised through the CLI
COMMAND_OF = {"copy": "copy", "archive": "archive", "backfill": "backfill", "load": "load",
              "export": "export", "verify": "verify", "prune": "prune", "pause": "pause",
              "resume": "resume", "cancel": "cancel", "run_file": "run", "check_file": "run",
              "list_dead_letters": "dlq", "show_dead_letter": "dlq",
              "replay_dead_letters": "dlq", "purge_dead_letters": "dlq"}


def _sources() -> dict[Path, str]:
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]
    return {p: p.read_text(encoding="utf-8") for p in files if p.name != Path(__file__).name}


def test_all_is_the_documented_surface() -> None:
    page = LIBRARY_PAGE.read_text(encoding="utf-8")
    section = page.split("## The public surface", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    documented = set(re.findall(r"`etl\.(\w+)`", table))
    documented |= set(re.findall(r"`(\w+Error)`", table))
    assert documented == set(etl.__all__) - {"__version__"}


def test_every_option_of_every_public_function_is_exercised() -> None:
    sources = _sources()
    unexercised = []
    for name in etl.__all__:
        fn = getattr(etl, name)
        if not inspect.isfunction(fn):
            continue
        params = list(inspect.signature(fn).parameters.values())
        for i, p in enumerate(params):
            if i == 0 and p.kind is p.POSITIONAL_OR_KEYWORD:
                continue  # passed positionally: etl.load(files, …), etl.run_file(path)
            cmd, opt = COMMAND_OF.get(name), "--" + p.name.replace("_", "-")
            if not any((f"{name}(" in text and f"{p.name}=" in text)
                       or (cmd and f'"{cmd}"' in text and f'"{opt}"' in text)
                       or (cmd and path.suffix == ".md" and f"etl {cmd}" in text
                           and f"{opt} " in text)
                       for path, text in sources.items()):
                unexercised.append(f"etl.{name}({p.name}=…)")
    assert unexercised == [], "\n".join(unexercised)


def test_import_loads_no_heavy_library() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import etl"],
                         capture_output=True, text=True, check=True)
    loaded = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    heavy = {"psycopg", "sqlalchemy", "polars", "pyarrow", "rich", "tenacity", "pymysql",
             "prometheus_client"}
    assert loaded & heavy == set()

# The two commands at the top of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("etl needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash fixtures/demo.sh

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/copy_pg.py; a=$$?; $(PY) bench/copy_bad_rows.py; b=$$?; $(PY) bench/copy_upsert.py; c=$$?; $(PY) bench/copy_mariadb.py; d=$$?; $(PY) bench/archive_pg.py; e=$$?; $(PY) bench/load_csv.py; f=$$?; $(PY) bench/export_pg.py; g=$$?; $(PY) bench/verify_pg.py; h=$$?; exit $$((a | b | c | d | e | f | g | h))

lint: $(STAMP)
	$(VENV)/bin/ruff check etl tests bench fixtures
	$(VENV)/bin/mypy etl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache reports

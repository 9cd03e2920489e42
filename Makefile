# The two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
# 2 workers by default (the CI machines have 2 cores); override with `make test PYTEST_WORKERS=0`.
# worksteal: an idle worker takes tests queued on the other (tests/conftest.py puts the slow ones first).
PYTEST_WORKERS ?= 2

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal tests

demo: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) -m sparseformer demo

bench: $(STAMP)
	$(PY) -m sparseformer bench --quick --out=bench

clean:
	rm -rf $(VENV) runs bench .pytest_cache

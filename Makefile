# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv from pyproject.toml on first use (the pinned development set, extra `dev`).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m pretrain.run recipes/demo.yaml --dry-run

test: $(VENV)/.installed
	$(PY) -m pytest

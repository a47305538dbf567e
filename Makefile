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

DEMO := runs/demo/data

demo: $(VENV)/.installed
	$(PY) -m data_tools.synthetic $(DEMO)/images
	$(PY) -m data_tools.shard $(DEMO)/images/train $(DEMO)/train --shard-samples 250 --workers 2
	$(PY) -m data_tools.shard $(DEMO)/images/val $(DEMO)/val --shard-samples 100 --name val --workers 2
	$(PY) -m pretrain.run recipes/demo.yaml
	$(PY) -m pretrain.run recipes/demo_finetune.yaml
	$(PY) -m pretrain.export runs/demo/finetune --format hf runs/demo/hf --overwrite
	$(PY) -m pretrain.export runs/demo/finetune --format onnx runs/demo/model.onnx --overwrite

# Whole test files side by side, one per core, the longest first (tests/conftest.py orders them).
test: $(VENV)/.installed
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

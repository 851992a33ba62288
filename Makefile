# `make demo` and `make test` create .venv with pip when it is missing, so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train.py fit --config configs/demo.yaml

test: $(VENV)/.installed
	WANDB_MODE=offline $(PY) -m pytest -q

lint: $(VENV)/.installed  # ruff, configured in pyproject.toml; `ruff format .` mends the formatting
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs data/demo

# `make run` / `make test` create .venv on first use (CPU torch by default; the other packages at the
# versions in constraints.txt, which the tests last passed with), then run.
# GPU machines: make install TORCH="torch" (a CUDA build), or install into your own env: see README.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run test plan clean-outputs

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/harness $(ARGS)

plan: $(BIN)/.installed
	$(BIN)/harness mode=plan $(ARGS)

test: $(BIN)/.installed
	$(BIN)/pytest -q $(ARGS)

clean-outputs:
	rm -rf outputs/[0-9]* outputs/multirun

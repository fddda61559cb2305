# Two set-up commands for a fresh clone: `make demo` and `make test`.
# torch is installed first and pinned: this machine holds its CPU build on disk,
# and an unpinned torch would pull a CUDA build of several GB.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO ?= demo

.PHONY: install test test-fast demo bench clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m musiclm.demo --out $(DEMO)

clean-demo:
	rm -rf $(DEMO)

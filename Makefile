# Two set-up commands for a fresh clone: `make demo` and `make test`.
# torch is installed first and pinned: this machine holds its CPU build on disk,
# and an unpinned torch would pull a CUDA build of several GB.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO ?= demo

.PHONY: install system-deps test test-fast demo bench clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,app]"
	touch $@

# tests/test_app.py drives Debian's Chromium (Playwright, never `playwright install`); the page
# streams audio through gradio, which encodes with ffmpeg. As root they are installed with apt;
# otherwise the app's tests fail and say how to install them.
system-deps:
	@missing=""; test -x /usr/bin/chromium || missing="chromium"; command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		echo "apt-get install -y $$missing"; apt-get update -qq && apt-get install -y -qq $$missing; fi

install: $(VENV)/.installed system-deps

# Two workers, whole test modules each; the modules that start Ray run together on one (tests/conftest.py).
test: install
	$(VENV)/bin/lint-imports  # the layers of .importlinter (docs/architecture.md): no layer break, no circle
	$(PY) -m pytest -q -n 2

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: $(VENV)/.installed  # the demo needs no browser: system-deps are for the tests
	$(PY) -m musiclm.demo --out $(DEMO)

clean-demo:
	rm -rf $(DEMO)

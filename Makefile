# The two commands of the README:
#   make run    set up (first time) and run the main job
#   make test   set up (first time) and run the test suite
# Set-up: a virtualenv in .venv with the exact pins of requirements-ci.txt, then the
# package in editable mode with its C++ extension (built with ninja, against the torch
# just installed: hence --no-build-isolation).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deqkern-installed

.PHONY: run test setup bench
setup: $(STAMP)

$(STAMP): requirements-ci.txt setup.py pyproject.toml $(wildcard csrc/*.cpp)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-ci.txt
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install -q -e . --no-build-isolation
	touch $@

run: $(STAMP)
	$(PY) -m deqkern $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

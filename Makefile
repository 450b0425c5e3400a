# The README's commands. Every target that runs something first runs the idempotent set-up
# (launch/install.sh: seconds when everything is in place, ~5 minutes the first time on 2 cores;
# README.md, "What set-up does", says what was measured).
VENV ?= .venv
export VENV := $(abspath $(VENV))
PY := $(VENV)/bin/python

.PHONY: setup demo test info bench clean

setup:
	@bash launch/install.sh

demo: setup
	@$(VENV)/bin/qoda-hvd demo $(ARGS)

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

info: setup
	@$(VENV)/bin/qoda-hvd info

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

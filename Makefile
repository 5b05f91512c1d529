# Two commands do everything on a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-cluster test-fast install clean bench-smoke lock deploy-check

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)  # everything but the real multi-process Ray clusters (make test-cluster; CI runs both)
	$(BIN)/python -m pytest -q -m "not cluster" tests

test-cluster: $(STAMP)  # RayJob + RayService on a local Ray head, Ray Train workers, a GCS restart from Redis
	$(BIN)/python -m pytest -q -m cluster tests

# The fast tier: unit and in-process checks only (no Ray, no S3 server, no fresh processes)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Render every deploy overlay (kubectl's kustomize) and validate each object offline; make test runs the same checks
deploy-check: $(STAMP)
	$(BIN)/python -m tests.kube_manifests

demo: $(STAMP)
	$(BIN)/cl-serve demo

lock: $(STAMP)  # re-pin every dependency to what the venv resolved, keeping the serving image's pins (tools/lock.py)
	$(BIN)/python tools/lock.py $(BIN)/python

clean:
	rm -rf $(VENV) demo-run .pytest_cache

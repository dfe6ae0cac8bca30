# Every target creates .venv and installs what it needs, so each works as the first command on a
# fresh machine. torch is pinned to the local CPU wheel (2.13.0); torchvision is never installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements.txt requirements-dev.txt requirements-eval.txt setup.py | md5sum | cut -c1-10)

.PHONY: install test lint demo clean lock

# requirements.lock holds every package (transitive ones included) at an exact version; it is installed
# as it is, with --no-deps, so nothing is resolved on install day. torchvision is absent from it on purpose.
# The requirement files state what is needed (with reasons); `make lock` resolves them anew into the lock.
$(STAMP): requirements.lock requirements.txt requirements-dev.txt requirements-eval.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two workers, one thread each; a worker runs whole modules (tests/conftest.py).
test: lint
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

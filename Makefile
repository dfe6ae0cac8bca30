# Every target creates .venv and installs what it needs, so each works as the first command on a
# fresh machine. torch is pinned to the local CPU wheel (2.13.0); torchvision is never installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt requirements-eval.txt setup.py | md5sum | cut -c1-10)

.PHONY: install test lint demo clean

$(STAMP): requirements.txt requirements-dev.txt requirements-eval.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# lmms-eval pins torchvision, which would pull a CUDA torch: constrain to our pins, then drop torchvision.
	$(PY) -m pip install -q -c requirements.txt -r requirements-eval.txt
	$(PY) -m pip uninstall -y -q torchvision
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

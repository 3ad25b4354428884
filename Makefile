# `make test`  : create .venv (reused when present), install the pinned dependencies, run the whole suite.
# `make demo`  : the offline end-to-end demo (tiny models, synthetic data) on a CPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[torch,test]'
	touch $(STAMP)

.PHONY: install test
install: $(STAMP)

test: $(STAMP)
	-bash tools/install_browser.sh  # a failure here only makes the browser test skip, with the reason
	$(PY) -m pytest

# The demo rebuilds runs/demo from scratch each time (tools/demo.py --fresh); ~5-6 min on a 2-core CPU.
.PHONY: demo
demo: $(STAMP)
	$(PY) tools/demo.py --out runs/demo --fresh

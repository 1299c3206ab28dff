# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

DEMO_RECIPE ?= ddpm-digits
DEMO_MINUTES ?= 2.5

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/genzoo train $(DEMO_RECIPE) --out runs/demo --minutes $(DEMO_MINUTES)
	$(VENV)/bin/genzoo sample runs/demo -n 64 --sampler ddim --steps 50 --out runs/demo/grid.png
	@echo "sample grid: runs/demo/grid.png"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs

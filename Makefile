# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-text test lint bench install clean ui-check mutation test-interop

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,diffusers,hf,ui,tensorboard,wandb,t5,ddpm-pytorch]'
	touch $(STAMP)

install: $(STAMP)

# The demo: one model per family that exists, trained for the same CPU budget on shapes 16x16,
# evaluated on one sample stream by the shapes judge (docs/evaluation.md).
DEMO_RECIPES ?= vae-shapes gan-shapes vqvae-shapes ddpm-shapes-small ddpm-shapes-small@ddpm:50
DEMO_MINUTES ?= 1.5

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/genzoo compare $(DEMO_RECIPES) --set data.image_size=16 --budget-minutes $(DEMO_MINUTES) \
		--samples 500 --segments 2 --out runs/demo
	@echo "leaderboard: runs/demo/leaderboard.md"

# Text to image (issue 22, docs/text.md): GLIDE, DALL·E 2 and, for reference, DALL·E, each trained on shapes for the
# same CPU budget (split between a recipe's stages as its steps are), judged on the caption (each attribute and all
# four) on the test split and on the held-out colour x shape pairs, with one grid row of samples per prompt.
TEXT_RECIPES ?= glide-shapes dalle2-shapes dalle-shapes
# 45 minutes: glide-shapes' own length until 12-01 (50 since, with 6 text layers; dalle2-shapes 47.5-52.6); at 20 the upsamplers drew no shapes; at 45 the
# whole target takes 152 min on 2 cores (docs/text.md)
TEXT_MINUTES ?= 45
TEXT_PROMPTS ?= --prompt "a large red circle in the top left" --prompt "a small blue square in the bottom right" \
	--prompt "a large green triangle in the centre" --prompt "a small yellow cross in the top centre" \
	--prompt "a large red triangle in the bottom left"
TEXT_EVAL = --samples 200 --metrics attribute-accuracy,fd

demo-text: $(STAMP)
	rm -rf runs/demo-text
	$(VENV)/bin/genzoo compare $(TEXT_RECIPES) --budget-minutes $(TEXT_MINUTES) --segments 1 $(TEXT_EVAL) \
		$(TEXT_PROMPTS) --out runs/demo-text
	$(VENV)/bin/genzoo compare $(addprefix runs/demo-text/runs/,$(TEXT_RECIPES)) --split heldout $(TEXT_EVAL) \
		--out runs/demo-text/heldout
	@echo "leaderboards: runs/demo-text/leaderboard.md (test captions), runs/demo-text/heldout/leaderboard.md"

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest -q

# Equivalence with reference libraries that cannot share .venv (docs/interop.md): DALLE2-pytorch pins
# open-clip-torch<3, so it gets an environment of its own, .venv-interop, and only the tests marked `interop` run there.
INTEROP := .venv-interop
INTEROP_STAMP := $(INTEROP)/.installed

$(INTEROP_STAMP): pyproject.toml
	test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip install --quiet --upgrade pip
	$(INTEROP)/bin/python -m pip install --quiet -e '.[dev,dalle2-pytorch]'
	touch $(INTEROP_STAMP)

# only the files holding interop tests are collected: .venv-interop lacks make test's other extras
test-interop: $(INTEROP_STAMP)
	$(INTEROP)/bin/python -m pytest -q -m interop $(shell grep -l 'mark.interop' tests/test_*.py)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/run.py

# The page `genzoo serve` makes, in a real headless browser (docs/ui.md): Debian's Chromium (installed when missing),
# driven by playwright through its executable path (playwright's own browser download is never used).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

ui-check: $(STAMP)
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	$(PY) -m pip install --quiet playwright
	$(PY) benchmarks/ui_check.py

# Mutation testing of the diffusion math and the trainer (docs/diffusion.md, "Mutation testing"): mutmut with the
# scope and the fast test selection of [tool.mutmut] in pyproject.toml, one worker, one thread. Results stay in
# mutants/ (git-ignored), so a second run tests only new or changed code; MUTANTS='genzoo.diffusion.samplers.*'
# (mutant-name globs) reruns just those. `mutmut results` lists the survivors, `mutmut show NAME` shows one.
MUTANTS ?=

mutation: $(STAMP)
	$(PY) -m pip install --quiet 'mutmut>=3.8,<4'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 1 $(MUTANTS)
	$(PY) benchmarks/mutation_report.py

clean:
	rm -rf $(VENV) $(INTEROP) runs

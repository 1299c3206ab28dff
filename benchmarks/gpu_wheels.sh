#!/usr/bin/env bash
# Wheels that genzoo needs on the lent GPU machine and its image lacks (it has torch, pluggy, safetensors,
# timm, yaml, tqdm; not pydantic). That machine reaches no registry, so they travel in .whl (git-ignored).
# Usage: bash benchmarks/gpu_wheels.sh; docs/performance.md gives the device command that installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pin() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(pin pydantic)" "pydantic_core==$(pin pydantic_core)" "annotated-types==$(pin annotated-types)" \
  "typing-inspection==$(pin typing-inspection)" "typing_extensions==$(pin typing_extensions)"
.venv/bin/pip wheel -q --no-deps --no-build-isolation . -w .whl  # genzoo itself: its entry points name the built-in plugins
ls .whl

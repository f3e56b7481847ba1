#!/usr/bin/env bash
# Build .gpu/ for a lent GPU machine: ../shared/gpu/bundle.sh's wheels plus the ones lf-train imports
# that it lacks (Optuna and its SQLAlchemy storage, for sweeps). Run here, from the
# project root:  bash bench/gpu_bundle.sh   then one device call (see bench/gpu_checks.sh).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/gpu/bundle.sh
pin() { grep -iE "^$1==" constraints.txt | head -n 1; }
wheels=(); for p in optuna alembic colorlog Mako SQLAlchemy; do
  v=$(pin "$p") || { echo "no pin for $p in constraints.txt" >&2; exit 1; }; wheels+=("$v"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl "${wheels[@]}"
du -sh .gpu | sed 's/^/bundle with the sweeper: /'

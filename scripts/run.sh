#!/usr/bin/env bash
# Set up the project's virtual environment (idempotent) and run one job in it.
#   bash scripts/run.sh demo    register the bundled sample pair with the shipped default model, print metrics
#   bash scripts/run.sh test    run the test suite (pytest arguments may follow)
#   bash scripts/run.sh setup   only set up
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"
shift || true

python=${PYTHON:-python3}
venv=.venv
stamp="$venv/.installed-$(cat pyproject.toml scripts/run.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "Setting up $venv (torch 2.13.0 CPU build first, then the project)..." >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,slicer,classical,training]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi

case "$job" in
    setup) ;;
    demo) exec "$venv/bin/deepregistration" demo "$@" ;;
    test) exec "$venv/bin/python" -m pytest -q Testing "$@" ;;
    *) echo "usage: bash scripts/run.sh demo|test|setup" >&2; exit 2 ;;
esac

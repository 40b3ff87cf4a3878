"""Data parallel: the same entry point under ``accelerate launch`` with 2 CPU processes (gloo) matches one
process with the same global batch (split_batches: each process takes its half of every global batch).

The launcher is ``accelerate launch --multi_gpu --num_processes 2`` with no GPU visible (CUDA_VISIBLE_DEVICES
empty): ``--multi_gpu`` is Accelerate's torchrun-based multi-process launcher, and the processes, finding no
GPU, form a gloo process group on the CPU (``DistributedType.MULTI_CPU``). ``--cpu`` is NOT the way: with it
``accelerate launch`` takes its simple launcher, which starts ONE process (several only through MPI with
``--mpirun_hostfile``), so ``--cpu --num_processes 2`` trains in a single process with num_processes 1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

# F/T/T: no dropout anywhere, so the two runs differ only by float summation order. 52 samples: the last global
# batch holds 4, so one process gets 4 real rows + 4 padding rows and the other only padding (Accelerate's
# even_batches), which must count neither in the loss nor in the gradient. Explicit settings, not the
# profile's defaults.
ARGS = ["--profile", "tiny", "--size", "24", "--max-train-samples", "52", "--max-eval-samples", "32",
        "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--min-lr", "1e-5", "--weight-decay", "0.05",
        "--seed", "0", "--vit", "F", "--jtm", "T", "--dec", "T", "--mixed-precision", "no", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # CPU processes (gloo) even on a GPU machine
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)  # generous: a loaded machine
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    # one process first: it also builds the synthetic set's cache, so the two processes below only read it
    _run([sys.executable, "-m", "mile_utils", "train", *ARGS, "--out", str(tmp_path / "one")])
    _run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
          "-m", "mile_utils", "train", *ARGS, "--out", str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["environment"]["num_processes"] == 1 and two["environment"]["num_processes"] == 2
    assert two["data"]["train"] == one["data"]["train"] == 52
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-4)
    assert abs(two["metrics"]["global"]["accuracy"] - one["metrics"]["global"]["accuracy"]) <= 100 / 32 + 1e-9
    # only the main process writes: one results file, one predictions file, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())

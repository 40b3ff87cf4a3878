"""Nothing lost: a training process killed (SIGKILL) after its first checkpoint, then resumed, ends exactly
where an uninterrupted run ends.

F/lora/T: LoRA dropout (0.1) and the shuffled data order are both random, so this fails if either depends on
anything but (seed, epoch): e.g. the order once did, through Accelerate's DataLoaderShard re-setting the
sampler's epoch to the number of epochs iterated in this process (0 again after a resume).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# explicit settings (not the profile's defaults); 3 steps an epoch, 2 epochs left after the kill
ARGS = ["--profile", "tiny", "--size", "24", "--max-train-samples", "48", "--max-eval-samples", "32",
        "--epochs", "3", "--batch-size", "16", "--lr", "1e-3", "--min-lr", "1e-5", "--weight-decay", "0.05",
        "--seed", "0", "--vit", "F", "--jtm", "lora", "--dec", "T", "--rank", "4", "--no-progress"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mile_utils", "train", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=900)  # generous: a loaded 2-core machine
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    whole = _train(tmp_path / "whole")
    _finish(whole)

    killed_dir = tmp_path / "killed"
    killed = _train(killed_dir)
    deadline = time.monotonic() + 600
    while not (killed_dir / "checkpoint.pt").exists():  # epoch 1's checkpoint, written atomically
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)  # mid-training: somewhere in epoch 2 (or while writing its checkpoint)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert not (killed_dir / "results.json").exists()

    _finish(_train(killed_dir, "--resume"))
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((killed_dir / "results.json").read_text())
    assert b["timing"]["resumed_from_epoch"] is not None
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-6)
    assert b["metrics"] == a["metrics"]
    preds_a = (tmp_path / "whole" / "predictions.jsonl").read_text()
    assert (killed_dir / "predictions.jsonl").read_text() == preds_a

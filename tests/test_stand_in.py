"""The tiny profile's stand-in for pretrained MISS: trained once on the built-in set's pretraining variant,
exported as a checkpoint folder, and the weights the chapters' runs start from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mile_utils.experiments import (
    RunConfig,
    build_run,
    load_results,
    pretrained_stand_in,
    run_experiment,
    trained_model,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs folder holding the stand-in (trained once for this module: it is the slow part)."""
    folder = tmp_path_factory.mktemp("stand-in") / "runs"
    pretrained_stand_in(folder, size=24, data_seed=3, progress=False)
    return folder


def test_stand_in_is_trained_once_on_other_data_and_starts_runs(runs, monkeypatch) -> None:
    trained = _count_training(monkeypatch)
    path = Path(pretrained_stand_in(runs, size=24, data_seed=3, progress=False))
    weights = path / "model.safetensors"
    assert weights.is_file() and trained == []  # reused, not trained again

    pre = load_results(runs / "tiny-pretrained" / "T-T-T")
    assert pre["config"]["data_seed"] == 4 and pre["config"]["spec_str"] == "T/T/T"
    assert pre["config"]["size"] == "pretraining:24" and pre["config"]["batch_size"] == 16  # the shifted set

    _, trained = trained_model(RunConfig.from_dict(pre["config"]))
    _, started = build_run(RunConfig(spec="F/F/lora", size=24, checkpoint=str(path)).resolved())
    a = trained.vision_model.embeddings.patch_embedding.weight
    b = started.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(a, b)
    _, fresh = build_run(RunConfig(spec="F/F/lora", size=24).resolved())
    assert not torch.equal(a, fresh.vision_model.embeddings.patch_embedding.weight)


def _count_training(monkeypatch) -> list[str]:
    """The runs trained from now on (the runner's call to the loop), by spec."""
    import mile_utils.experiments as experiments

    calls: list[str] = []
    real = experiments.train_model

    def counted(model, tokenizer, dataset, options, **kwargs):
        calls.append(options.spec_str)
        return real(model, tokenizer, dataset, options, **kwargs)

    monkeypatch.setattr(experiments, "train_model", counted)
    return calls


def _config(runs: Path, checkpoint: str, **changes) -> RunConfig:
    return RunConfig(spec="F/F/lora", size=24, epochs=1, batch_size=16, max_train_samples=32, max_eval_samples=16,
                     checkpoint=checkpoint, out=str(runs / "tiny-synthetic" / "F-F-lora"), **changes)


def test_a_moved_or_copied_runs_folder_is_reused(runs, tmp_path, monkeypatch) -> None:
    """Runs are found by what determines them (settings, data and starting weights by content), never by path."""
    trained = _count_training(monkeypatch)
    first = tmp_path / "first" / "runs"
    shutil.copytree(runs, first)
    before = run_experiment(_config(first, pretrained_stand_in(first, size=24, data_seed=3, progress=False)),
                            progress=False)
    assert trained == ["F/F/lora"]  # the copied stand-in is found
    moved = tmp_path / "moved" / "to" / "another" / "prefix" / "runs"
    shutil.move(str(first), moved)
    copied = tmp_path / "copy" / "runs"
    shutil.copytree(moved, copied)
    for folder in (moved, copied):
        checkpoint = pretrained_stand_in(folder, size=24, data_seed=3, progress=False)
        assert Path(checkpoint).parent == folder / "tiny-pretrained"  # found where it lies now
        after = run_experiment(_config(folder, checkpoint), skip_finished=True, progress=False)
        assert trained == ["F/F/lora"]  # nothing trained again
        assert after["identity"] == before["identity"] and after["metrics"] == before["metrics"]
        assert after["history"] == before["history"]
        assert after["config"]["out"] == str(folder / "tiny-synthetic" / "F-F-lora")
    run_experiment(_config(copied, checkpoint, lr=5e-4), skip_finished=True, progress=False)
    assert trained[1:] == ["F/F/lora"]  # another hyper-parameter: trained again
    weights = Path(pretrained_stand_in(moved, size=24, data_seed=3, progress=False)) / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    run_experiment(_config(moved, str(weights.parent)), skip_finished=True, progress=False)
    assert trained[2:] == ["F/F/lora"]  # same path, other starting weights: trained again

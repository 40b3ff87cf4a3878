"""The tiny profile's stand-in for pretrained MISS: trained once on another instance of the built-in set,
exported as a checkpoint folder, and the weights the chapters' runs start from."""

from __future__ import annotations

from pathlib import Path

import torch

from mile_utils.experiments import RunConfig, build_run, load_results, pretrained_stand_in, trained_model


def test_stand_in_is_trained_once_on_other_data_and_starts_runs(tmp_path) -> None:
    path = Path(pretrained_stand_in(tmp_path, size=24, data_seed=3, progress=False))
    weights = path / "model.safetensors"
    assert weights.is_file()
    first = weights.stat().st_mtime_ns
    assert Path(pretrained_stand_in(tmp_path, size=24, data_seed=3, progress=False)) == path
    assert weights.stat().st_mtime_ns == first  # reused, not trained again

    pre = load_results(tmp_path / "tiny-pretrained" / "T-T-T")
    assert pre["config"]["data_seed"] == 4 and pre["config"]["spec_str"] == "T/T/T"

    _, trained = trained_model(RunConfig.from_dict(pre["config"]))
    _, started = build_run(RunConfig(spec="F/F/lora", size=24, checkpoint=str(path)).resolved())
    a = trained.vision_model.embeddings.patch_embedding.weight
    b = started.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(a, b)
    _, fresh = build_run(RunConfig(spec="F/F/lora", size=24).resolved())
    assert not torch.equal(a, fresh.vision_model.embeddings.patch_embedding.weight)

"""The experiment runner: results.json schema, predictions, grid skipping, unwritable output, paper grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mile_utils.experiments import RunConfig, paper_grid, paper_rows, results_row, run_experiment, run_grid
from mile_utils.profiles import get_profile

FAST = dict(profile="tiny", dataset="synthetic", size=24, epochs=2, batch_size=16, max_train_samples=64,
            max_eval_samples=32)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "F-T-lora"
    config = RunConfig(spec="F/T/lora", out=str(out), **FAST)
    return config, run_experiment(config, progress=False)


def test_results_json_schema(finished):
    config, results = finished
    out = config.resolved().out
    on_disk = json.loads((Path(out) / "results.json").read_text())
    assert on_disk == results
    assert results["config"]["spec_str"] == "F/T/lora" and results["config"]["epochs"] == 2
    params = results["params"]
    assert 0 < params["trainable"] < params["total"] and 0 < params["percent"] < 100
    assert set(params["components"]) == {"vit", "jtm", "dec"}
    assert params["components"]["vit"]["trainable"] == 0
    for block in ("open", "closed", "global"):
        assert 0.0 <= results["metrics"][block]["accuracy"] <= 100.0
    assert "yes_no" in results["metrics"]
    assert results["timing"]["wall_s"] > 0 and results["timing"]["train_samples_per_s"] > 0
    memory = results["memory"]  # the training loop's own peak; the frozen ViT's precompute counted apart
    assert memory["peak_bytes"] > 0 and memory["kind"] == "process_peak_rss_of_run"
    assert memory["cache_bytes"] == results["cache"]["bytes"] > 0
    assert set(results["identity"]) == {"key", "data", "checkpoint", "tokenizer"}
    assert str(Path(out).parent) not in json.dumps(results["identity"])  # no path in the identity
    env = results["environment"]
    assert {"torch", "transformers", "peft", "accelerate", "device", "python"} <= set(env)
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert results["cache"]["vit"] and not results["cache"]["jtm"]


def test_predictions_and_weights_written(finished):
    config, results = finished
    out = Path(config.resolved().out)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == results["data"]["eval"] == 32
    assert set(rows[0]) == {"qid", "question", "answer", "prediction", "answer_type", "content_type"}
    assert (out / "weights" / "adapter_spec.json").is_file()
    assert not (out / "checkpoint.pt").exists()  # deleted once results are safe


def test_grid_skips_finished_runs(finished, monkeypatch):
    config, results = finished
    import mile_utils.experiments as experiments

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiments, "train_model", fail)
    table = run_grid([config], progress=False)
    assert len(table) == 1 and table.loc[0, "spec"] == "F/T/lora"
    assert table.loc[0, "global"] == results["metrics"]["global"]["accuracy"]
    assert table.loc[0, "rank"] == 4
    # a run without LoRA has no rank in the table
    no_lora = {**results, "config": {**results["config"], "spec": {**results["config"]["spec"], "dec": "T"},
                                     "spec_str": "F/T/T"}}
    assert results_row(no_lora)["rank"] is None
    with pytest.raises(AssertionError, match="trained again"):  # another config in the same folder reruns
        run_grid([RunConfig(spec="F/T/lora", out=config.out, **{**FAST, "epochs": 3})], progress=False)


def test_unwritable_output_fails_before_training(tmp_path, monkeypatch):
    import mile_utils.experiments as experiments

    monkeypatch.setattr(experiments, "train_model", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="not writable"):
        run_experiment(RunConfig(out=str(blocker / "run"), **FAST), progress=False)


def test_paper_grid_has_the_23_rows_and_full_fine_tuning(tmp_path):
    tables = {n: [c.spec_str for c in paper_grid(RunConfig(**FAST), table=n)] for n in (1, 2, 3, 4)}
    assert sum(map(len, tables.values())) == 23 and "T/T/T" not in sum(tables.values(), [])
    assert tables == {n: [r["spec"] for r in paper_rows(False) if r["table"] == n] for n in (1, 2, 3, 4)}
    with pytest.raises(ValueError, match="Tables 1-4"):
        paper_grid(table=5)
    rows = paper_rows()
    assert len(rows) == 24 and rows[-1]["spec"] == "T/T/T"
    configs = paper_grid(RunConfig(**FAST), out_root=tmp_path)
    assert len({c.out for c in configs}) == 24  # one folder per configuration
    lora = [c for c in configs if c.spec.dec == "lora" and c.spec.jtm == "lora" and c.spec.vit == "F"]
    assert sorted(c.spec.rank for c in lora) == [4, 8]
    assert {c.spec_str for c in configs} >= {"F/F/prefix", "F/ia3/ia3", "T/T/ptv2", "F/T/lora"}
    only = paper_grid(RunConfig(**FAST), specs=["F/F/prefix", "T/T/T"], out_root=tmp_path)
    assert [c.spec_str for c in only] == ["F/F/prefix", "T/T/T"]


def test_cli_is_generated_from_the_run_config(monkeypatch, capsys):
    import mile_utils.experiments as experiments
    from mile_utils.__main__ import build_parser, main

    class Reached(Exception):
        pass

    seen = {}

    def runner(config, **kwargs):
        seen["config"] = config
        raise Reached

    monkeypatch.setattr(experiments, "run_experiment", runner)
    with pytest.raises(Reached):
        main(["train", "--vit", "F", "--jtm", "lora", "--dec", "lora", "--rank", "8", "--epochs", "3", "--out", "x",
              "--no-use-cache", "--max-train-samples", "10", "--lora-dropout", "0.05", "--reference-quirk",
              "--method-lr", "ia3=0.02"])
    config = seen["config"]
    assert config.spec_str == "F/lora/lora" and config.spec.rank == 8 and config.spec.lora_dropout == 0.05
    assert config.epochs == 3 and config.use_cache is False and config.reference_quirk is True
    assert config.max_train_samples == 10 and config.out == "x" and config.method_lr == {"ia3": 0.02}
    assert config.lr is None and config.resolved().lr == get_profile("tiny").lr  # profile default filled
    # every RunConfig field is a flag, with the dataclass's default
    defaults = vars(build_parser("mile").parse_args(["train"]))
    assert {k: defaults[k] for k in RunConfig().to_dict() if k not in ("spec", "spec_str")} == {
        k: v for k, v in RunConfig().to_dict().items() if k not in ("spec", "spec_str")}
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()
    # the usage line names the program that was run; bad input: one line, no traceback
    assert build_parser("mile").format_usage().startswith("usage: mile ")
    assert main(["train", "--vit", "loraa"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "loraa" in err


def test_a_run_asked_for_twice_at_once_trains_once(tmp_path, monkeypatch):
    """Chapters built side by side share runs: the second caller waits on the run folder's lock, then reads."""
    import threading

    import mile_utils.experiments as experiments

    trained, train = [], experiments.train_model
    monkeypatch.setattr(experiments, "train_model", lambda *a, **k: trained.append(1) or train(*a, **k))
    config = RunConfig(spec="F/F/lora", out=str(tmp_path / "run"), **{**FAST, "epochs": 1})
    results = [None, None]

    def ask(i: int) -> None:
        results[i] = run_experiment(config, skip_finished=True, progress=False)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert trained == [1] and results[0] == results[1] is not None  # the same results.json, timings included


def test_waiting_for_a_locked_run_times_out_naming_the_lock(tmp_path, monkeypatch):
    import mile_utils.experiments as experiments
    from mile_utils.files import folder_lock

    monkeypatch.setattr(experiments, "train_model", lambda *a, **k: pytest.fail("trained under another's lock"))
    out = tmp_path / "run"
    with folder_lock(out, timeout_s=1), pytest.raises(TimeoutError, match=r"\.lock stayed locked for 0 s"):
        run_experiment(RunConfig(out=str(out), **FAST), skip_finished=True, progress=False, lock_timeout_s=0.2)

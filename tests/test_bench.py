"""The benchmark's bookkeeping (not its figures: speed belongs in the benchmark, not in a test)."""

import pytest

from mile_utils.bench import _stats, format_table, run_benchmark


def test_bench_alternates_step_by_step_in_fresh_processes_and_pools_them():
    report = run_benchmark("tiny", steps=2, repeats=2, processes=2, specs=["F/F/lora"], device="cpu", timeout_s=600)
    (config,) = report["configs"]
    assert config["spec"] == "F/F/lora" and config["steps"] == 2 and report["repeats"] == 2
    assert report["processes"] == 2 and len(config["speedup_per_process"]) == 2  # one repeat in each process
    assert report["threads"] == 1 and config["torch_threads"] == 1  # tiny on a CPU: one thread, as the book
    ours, ref = config["ours"], config["reference"]
    # each repeat's median step (ours: between two reference steps) times the steps: positive, every repeat
    assert all(s > 0 for s in ours["seconds"]["values"]) and len(ours["seconds"]["values"]) == 2
    assert all(s > 0 for s in ref["seconds"]["values"]) and len(ref["seconds"]["values"]) == 2
    assert ours["cached"]["vit"] and ours["cached"]["jtm"]  # F/F/*: the frozen parts precomputed
    ratios = [o / r for o, r in zip(ours["samples_per_s"]["values"], ref["samples_per_s"]["values"], strict=True)]
    assert config["speedup"]["values"] == pytest.approx(ratios, rel=1e-3)
    assert ours["peak_memory_bytes"] > 0 and ref["peak_memory_bytes"] > 0
    assert "F/F/lora" in format_table(report)


def test_the_median_interval_is_the_order_statistics_of_a_binomial():
    # n = 7: only min and max leave less than 2.5% on each side (P = 1/128); n = 41: the 14th and 28th values
    assert _stats([5, 1, 4, 2, 7, 3, 6])["ci95"] == [1, 7]
    assert _stats([float(v) for v in range(41, 0, -1)])["ci95"] == [14.0, 28.0]
    assert _stats([1.0, 2.0, 3.0])["ci95"] is None  # too few repeats for any 95% interval


def test_one_step_epochs_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="steps 1: at least 2"):
        run_benchmark("tiny", steps=1, repeats=3, specs=["F/F/lora"], device="cpu")
    with pytest.raises(ValueError, match="processes 4: from 1 to repeats"):
        run_benchmark("tiny", steps=2, repeats=3, processes=4, specs=["F/F/lora"], device="cpu")

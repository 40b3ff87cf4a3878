"""The benchmark's bookkeeping (not its figures: speed belongs in the benchmark, not in a test)."""

import pytest

from mile_utils.bench import format_table, run_benchmark


def test_bench_alternates_step_by_step_in_a_fresh_process():
    report = run_benchmark("tiny", steps=2, repeats=2, specs=["F/F/lora"], device="cpu", timeout_s=600)
    (config,) = report["configs"]
    assert config["spec"] == "F/F/lora" and config["steps"] == 2 and report["repeats"] == 2
    ours, ref = config["ours"], config["reference"]
    # our epoch's time less the reference steps timed inside it: positive, and both loops timed every repeat
    assert all(s > 0 for s in ours["seconds"]["values"]) and len(ours["seconds"]["values"]) == 2
    assert all(s > 0 for s in ref["seconds"]["values"]) and len(ref["seconds"]["values"]) == 2
    assert ours["cached"]["vit"] and ours["cached"]["jtm"]  # F/F/*: the frozen parts precomputed
    ratios = [o / r for o, r in zip(ours["samples_per_s"]["values"], ref["samples_per_s"]["values"], strict=True)]
    assert config["speedup"]["values"] == pytest.approx(ratios, rel=1e-3)
    assert ours["peak_memory_bytes"] > 0 and ref["peak_memory_bytes"] > 0
    assert "F/F/lora" in format_table(report)

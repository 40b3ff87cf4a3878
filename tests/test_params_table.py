"""The paper's 23 `params_pct` cells (Tables 1-4), counted on the meta device, and the `params` CLI."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from mile_utils.__main__ import main
from mile_utils.adapters import AdapterSpec, parameter_report


def _cells() -> list[dict]:
    source = resources.files("mile_utils.reference").joinpath("mile_paper_results.json")
    text = source.read_text(encoding="utf-8")
    return json.loads(text)["tables_1_to_4"]


CELLS = _cells()


def test_there_are_23_cells():
    assert len(CELLS) == 23


def _cell_id(c: dict) -> str:
    return f"t{c['table']}-{c['vit']}/{c['jtm']}/{c['dec']}-r{c['rank']}"


@pytest.mark.parametrize("cell", CELLS, ids=_cell_id)
def test_params_pct_matches_paper(cell):
    # rank null: the row has no LoRA; otherwise the LoRA rank of that row
    spec = AdapterSpec(vit=cell["vit"], jtm=cell["jtm"], dec=cell["dec"], rank=cell["rank"] or 4)
    report = parameter_report(spec, profile="paper")
    assert round(report["percent"], 3) == pytest.approx(cell["params_pct"], abs=1e-9), report


def test_cli_params_json(capsys):
    argv = "params --vit F --jtm lora --dec lora --rank 4 --profile paper --json".split()
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"trainable", "total", "percent", "components"} <= set(report)
    assert round(report["percent"], 3) == 0.163
    assert report["trainable"] == 589_824 and report["total"] == 361_478_972 + 589_824
    assert report["components"]["jtm"] == {"method": "lora", "trainable": 294_912, "total": 137_553_408,
                                           "adapter": 294_912}

"""Metrics against hand-computed values (see the comments for the arithmetic)."""

from __future__ import annotations

import math

import pytest

from mile_utils.data import Record
from mile_utils.metrics import (
    compute_metrics,
    majority_baseline,
    mcnemar,
    normalize_answer,
    question_only_baseline,
)


def rec(qid: int | str, answer: str, answer_type: str, content_type: str = "X",
        question: str = "q?") -> Record:
    return Record(img_name="i.png", question=question, answer=answer, answer_type=answer_type,
                  content_type=content_type, qid=qid)


# qid: gold, answer_type, content_type -> prediction
RECORDS = [
    rec(1, "Left Lung", "OPEN", "Position"),       # "left lung." -> exact
    rec(2, "2", "OPEN", "Quantity"),               # "2 lesions" -> wrong; P 1/2, R 1, F1 2/3, BLEU-1 1/2
    rec(3, "Yes", "CLOSED", "Abnormality"),        # "yes" -> TP
    rec(4, "no", "CLOSED", "Abnormality"),         # "yes" -> FP
    rec(5, "T1", "CLOSED", "Modality"),            # "t1" -> exact, closed but not yes/no
    rec(6, "yes", "OPEN", "Abnormality"),          # "no" -> FN; open by label, closed by yes/no
    rec(7, "right upper lobe", "OPEN", "Position"),  # "the upper lobe" -> P 1, R 2/3, F1 .8, BLEU-1 e^-.5
]
PREDICTIONS = {1: "left lung.", 2: "2 lesions", 3: "yes", 4: "Yes", 5: "t1", 6: "no", 7: "the upper lobe"}


def test_normalize_answer() -> None:
    assert normalize_answer("  The Left-Lung. ") == "left lung"
    assert normalize_answer("An MRI!") == "mri"
    assert normalize_answer("T2 weighted,  axial") == "t2 weighted axial"
    assert normalize_answer(3) == "3"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    # a one-letter answer (an option letter) survives; an article is dropped only beside other words
    assert normalize_answer("A") == "a" and normalize_answer("(b)") == "b" and normalize_answer("The") == "the"
    assert normalize_answer("a lesion") == "lesion" and normalize_answer("A.") == normalize_answer("a")
    m = compute_metrics({1: "A", 2: "a", 3: ""}, [rec(1, "B", "CLOSED"), rec(2, "A", "CLOSED"), rec(3, "a", "OPEN")])
    assert m["closed"]["correct"] == 1 and m["open"]["correct"] == 0  # "" is not "a"


def test_wilson_interval_hand_values() -> None:
    # 8/10 at 95 %: centre (0.8 + 1.96²/20)/(1 + 1.96²/10) = 0.7167, half-width 0.2266 -> [49.0, 94.3]
    records = [rec(i, "yes" if i < 8 else "no", "CLOSED") for i in range(10)]
    acc = compute_metrics({i: "yes" for i in range(10)}, records)["closed"]
    assert acc["ci_low"] == pytest.approx(49.02, abs=0.01) and acc["ci_high"] == pytest.approx(94.33, abs=0.01)
    none_right = compute_metrics({i: "maybe" for i in range(10)}, records)["closed"]
    all_right = compute_metrics({i: r.answer for i, r in enumerate(records)}, records)["closed"]
    assert none_right["ci_low"] == 0.0 and all_right["ci_high"] == pytest.approx(100.0)
    assert compute_metrics({1: "x"}, [rec(1, "x", "OPEN")])["closed"] | {"accuracy": 0} == {
        "accuracy": 0, "n": 0, "correct": 0, "ci_low": 0.0, "ci_high": 100.0}


def test_accuracy_under_both_closed_definitions() -> None:
    m = compute_metrics(PREDICTIONS, RECORDS)
    assert m["n"] == 7
    # answer_type: open 1,2,6,7 (only 1 right); closed 3,4,5 (3 and 5 right)
    assert (m["open"]["correct"], m["open"]["n"]) == (1, 4) and m["open"]["accuracy"] == pytest.approx(25.0)
    assert (m["closed"]["correct"], m["closed"]["n"]) == (2, 3)
    assert m["closed"]["accuracy"] == pytest.approx(200 / 3)
    assert m["global"]["accuracy"] == pytest.approx(300 / 7)
    # yes/no: closed 3,4,6 (only 3 right); open 1,2,5,7 (1 and 5 right)
    assert (m["yes_no"]["closed"]["correct"], m["yes_no"]["closed"]["n"]) == (1, 3)
    assert (m["yes_no"]["open"]["correct"], m["yes_no"]["open"]["n"]) == (2, 4)
    assert m["yes_no"]["global"]["accuracy"] == m["global"]["accuracy"]
    assert m["open"]["ci_low"] == pytest.approx(4.56, abs=0.01)  # Wilson, 1/4


def test_closed_precision_recall_f1_and_confusion() -> None:
    prf = compute_metrics(PREDICTIONS, RECORDS)["closed_prf"]
    # gold yes: 3 (pred yes, TP), 6 (pred no, FN); gold no: 4 (pred yes, FP)
    assert (prf["tp"], prf["fp"], prf["fn"], prf["tn"], prf["n"]) == (1, 1, 1, 0, 3)
    assert prf["precision"] == pytest.approx(50.0) and prf["recall"] == pytest.approx(50.0)
    assert prf["f1"] == pytest.approx(50.0)
    assert prf["confusion"]["matrix"] == [[1, 1, 0], [1, 0, 0]]
    # an answer that is neither yes nor no is wrong, counted in the "other" column
    prf2 = compute_metrics({**PREDICTIONS, 4: "maybe"}, RECORDS)["closed_prf"]
    assert prf2["confusion"]["matrix"][1] == [0, 0, 1] and prf2["precision"] == pytest.approx(100.0)


def test_closed_prf_agrees_with_scikit_learn() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    gold = ["yes", "no", "yes", "yes", "no", "no", "yes"]
    pred = ["yes", "yes", "no", "yes", "no", "yes", "yes"]
    records = [rec(i, g, "CLOSED") for i, g in enumerate(gold)]
    prf = compute_metrics(dict(enumerate(pred)), records)["closed_prf"]
    p, r, f, _ = precision_recall_fscore_support(gold, pred, pos_label="yes", average="binary")
    assert (prf["precision"], prf["recall"], prf["f1"]) == pytest.approx((100 * p, 100 * r, 100 * f))


def test_open_token_metrics() -> None:
    tok = compute_metrics(PREDICTIONS, RECORDS)["open_tokens"]
    # per open question (P, R, F1, BLEU-1): q1 (1,1,1,1); q2 (.5,1,2/3,.5); q6 (0,0,0,0); q7 (1,2/3,.8,e^-.5)
    assert tok["n"] == 4
    assert tok["precision"] == pytest.approx(100 * 2.5 / 4)
    assert tok["recall"] == pytest.approx(100 * (2 + 2 / 3) / 4)
    assert tok["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0.8) / 4)
    assert tok["bleu1"] == pytest.approx(100 * (1.5 + math.exp(-0.5)) / 4)


def test_per_content_type() -> None:
    ct = compute_metrics(PREDICTIONS, RECORDS)["content_types"]
    assert {k: (v["correct"], v["n"]) for k, v in ct.items()} == {
        "Abnormality": (1, 3), "Modality": (1, 1), "Position": (1, 2), "Quantity": (0, 1)}


def test_matched_by_qid_not_order() -> None:
    rows = [{"qid": str(q), "prediction": p} for q, p in reversed(list(PREDICTIONS.items()))]
    assert compute_metrics(rows, RECORDS) == compute_metrics(PREDICTIONS, RECORDS)
    assert compute_metrics(PREDICTIONS, list(reversed(RECORDS)))["global"] == compute_metrics(
        PREDICTIONS, RECORDS)["global"]


def test_missing_unknown_and_duplicate_predictions() -> None:
    partial = {k: v for k, v in PREDICTIONS.items() if k != 5}
    with pytest.raises(ValueError, match="no prediction.*5"):
        compute_metrics(partial, RECORDS)
    with pytest.raises(ValueError, match="not in the records"):
        compute_metrics({**PREDICTIONS, 99: "x"}, RECORDS)
    with pytest.raises(ValueError, match="each qid predicted once"):
        compute_metrics([{"qid": 1, "prediction": "a"}, {"qid": "1", "prediction": "b"}], RECORDS[:1])
    with pytest.raises(ValueError, match="'prediction'"):
        compute_metrics([{"qid": 1, "answer": "a"}], RECORDS[:1])
    with pytest.raises(ValueError, match="appears twice"):
        compute_metrics({1: "a"}, [RECORDS[0], RECORDS[0]])


def test_empty_group_has_no_accuracy() -> None:
    m = compute_metrics({1: "left lung"}, RECORDS[:1])
    assert m["closed"]["accuracy"] is None and m["closed"]["n"] == 0
    assert m["open_tokens"]["n"] == 1


def test_baselines() -> None:
    train = [rec(1, "yes", "CLOSED", question="Is it big?"),
             rec(2, "yes", "CLOSED", question="Is it big?"),
             rec(3, "no", "CLOSED", question="Is it small?"), rec(4, "no", "CLOSED", question="Is it small?"),
             rec(5, "no", "CLOSED", question="Is it small?"),
             rec(6, "axial", "OPEN", question="Which plane?")]
    test = [rec(11, "yes", "CLOSED", question="is it BIG"), rec(12, "yes", "CLOSED", question="Is it small?"),
            rec(13, "axial", "OPEN", question="Which plane?"), rec(14, "no", "CLOSED", question="New one?")]
    maj = majority_baseline(train, test)
    assert maj["prediction"] == "no" and maj["global"]["correct"] == 1  # only q14
    qo = question_only_baseline(train, test)
    # q11 -> yes (right, normalised text matches), q12 -> no (wrong), q13 -> axial (right), q14 -> fallback no
    assert qo["global"]["correct"] == 3 and qo["seen_questions"] == pytest.approx(75.0)


def test_mcnemar_exact_hand_values() -> None:
    # 10 questions only A gets right, 2 only B, 5 both, 3 neither: p = 2 * P(X <= 2 | 12, 1/2) = 2 * 79 / 4096
    a = {i: i < 15 for i in range(20)}
    b = {i: 10 <= i < 17 for i in range(20)}
    t = mcnemar(a, b)
    assert (t["n"], t["b"], t["c"]) == (20, 10, 2) and t["p"] == pytest.approx(158 / 4096)
    assert mcnemar(b, a)["p"] == pytest.approx(t["p"]) and (mcnemar(b, a)["b"], mcnemar(b, a)["c"]) == (2, 10)
    # paired by qid, not by order (a pandas Series works too); nothing discordant -> p = 1
    import pandas as pd

    assert mcnemar(pd.Series(a), pd.Series(dict(reversed(list(a.items())))))["p"] == 1.0
    assert mcnemar({1: True, 2: True}, {1: False, 2: True})["p"] == 1.0  # b = 1, c = 0: 2 * 1/2, capped at 1
    with pytest.raises(ValueError, match="different questions"):
        mcnemar({1: True}, {2: True})


def test_baselines_expose_predictions() -> None:
    train, test = [rec(1, "yes", "CLOSED"), rec(2, "yes", "CLOSED")], [rec(3, "no", "CLOSED")]
    assert majority_baseline(train, test)["predictions"] == {3: "yes"}
    assert question_only_baseline(train, test)["predictions"] == {3: "yes"}

"""Med-VQA metrics, matched by ``qid`` (never by list order), with confidence intervals.

Two definitions of "closed" are reported side by side because the literature mixes them:

* ``answer_type == "CLOSED"`` (the datasets' own label, the standard; SLAKE English test: 416 closed / 645
  open) -> top-level ``open``, ``closed``, ``global``;
* a yes/no gold answer (what the MILE paper's tables used: 355 of SLAKE's 1,061 English test questions) ->
  ``yes_no.open``, ``yes_no.closed``, ``yes_no.global``.

Exact match is on :func:`normalize_answer` forms. Accuracies, precision/recall/F1, token metrics and interval
bounds are percentages; an empty group has ``accuracy`` None. Nothing here touches the network.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_PUNCT = re.compile(r"[^\w\s]|_")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
Z_95 = 1.959963984540054


def normalize_answer(text: Any) -> str:
    """Lower case, punctuation -> space, articles (a/an/the) removed, whitespace collapsed."""
    s = _PUNCT.sub(" ", str(text).lower())
    return " ".join(_ARTICLES.sub(" ", s).split())


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion, in percent (sane at 0 % and 100 %, unlike p +- z*se)."""
    if n == 0:
        return 0.0, 100.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def _accuracy(flags: Sequence[bool]) -> dict[str, Any]:
    n, c = len(flags), int(sum(flags))
    low, high = wilson_interval(c, n)
    return {"accuracy": 100 * c / n if n else None, "n": n, "correct": c, "ci_low": low, "ci_high": high}


def _get(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _prediction_map(predictions: Mapping[Any, Any] | Iterable[Mapping[str, Any]]) -> dict[str, str]:
    if isinstance(predictions, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in predictions.items()}
    out: dict[str, str] = {}
    for i, row in enumerate(predictions):
        if not isinstance(row, Mapping) or "qid" not in row:
            raise ValueError(f"prediction {i}: expected a mapping with 'qid' and 'prediction', got {row!r}")
        key = "prediction" if "prediction" in row else "pred" if "pred" in row else None
        if key is None:
            raise ValueError(f"prediction {i} (qid={row['qid']!r}): missing field 'prediction'")
        qid = str(row["qid"])
        if qid in out:
            raise ValueError(f"prediction {i}: qid {row['qid']!r} predicted twice")
        out[qid] = "" if row[key] is None else str(row[key])
    return out


def _token_scores(pred: str, gold: str) -> tuple[float, float, float, float]:
    """Token precision, recall, F1 and BLEU-1 of one normalised answer pair (fractions)."""
    p_tok, g_tok = pred.split(), gold.split()
    if not g_tok:
        same = float(not p_tok)
        return same, same, same, same
    if not p_tok:
        return 0.0, 0.0, 0.0, 0.0
    overlap = sum((Counter(p_tok) & Counter(g_tok)).values())  # clipped counts, as BLEU does
    precision, recall = overlap / len(p_tok), overlap / len(g_tok)
    f1 = 2 * precision * recall / (precision + recall) if overlap else 0.0
    brevity = 1.0 if len(p_tok) > len(g_tok) else math.exp(1 - len(g_tok) / len(p_tok))
    return precision, recall, f1, brevity * precision


def _yes_no_prf(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """P/R/F1 with "yes" as the positive class over yes/no gold answers; other predictions are just wrong."""
    labels, predicted = ("yes", "no"), ("yes", "no", "other")
    matrix = [[0, 0, 0], [0, 0, 0]]
    for pred, gold in pairs:
        matrix[labels.index(gold)][predicted.index(pred) if pred in labels else 2] += 1
    tp, fn = matrix[0][0], matrix[0][1] + matrix[0][2]
    fp, tn = matrix[1][0], matrix[1][1]
    precision = tp / (tp + fp) if tp + fp else 0.0  # zero_division=0, as scikit-learn's default
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "n": len(pairs),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "confusion": {"gold": list(labels), "predicted": list(predicted), "matrix": matrix},
    }


def compute_metrics(
    predictions: Mapping[Any, Any] | Iterable[Mapping[str, Any]],
    records: Sequence[Any],
    *,
    missing: str = "error",
) -> dict[str, Any]:
    """All metrics of ``predictions`` (qid -> answer, or rows with ``qid`` and ``prediction``) on ``records``.

    ``records`` are :class:`~mile_utils.data.Record` (or mappings with ``qid, answer, answer_type,
    content_type``). qids compare as strings, so 7 and "7" match. A prediction for a qid not in ``records``
    is an error. A record without a prediction is an error by default (a silently shorter evaluation would
    inflate accuracy); ``missing="wrong"`` counts it wrong instead and reports it under ``missing``.

    Returns ``open``/``closed``/``global`` (answer_type definition) and ``yes_no.{open,closed,global}``
    (yes/no definition), each ``{accuracy, n, correct, ci_low, ci_high}``; ``closed_prf`` (yes positive,
    with the confusion matrix); ``open_tokens`` (token precision/recall/F1 and BLEU-1, mean over OPEN
    questions); ``content_types`` (accuracy per content type); ``n``, ``missing``, ``missing_qids``.
    """
    if missing not in ("error", "wrong"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'wrong'")
    preds = _prediction_map(predictions)
    gold_by_qid: dict[str, Any] = {}
    for rec in records:
        qid = str(_get(rec, "qid"))
        if qid in gold_by_qid:
            raise ValueError(f"records: qid {qid!r} appears twice; metrics match predictions by qid")
        gold_by_qid[qid] = rec
    unknown = [q for q in preds if q not in gold_by_qid]
    if unknown:
        raise ValueError(f"{len(unknown)} prediction(s) for qids not in the records, e.g. {unknown[:5]}")
    absent = [q for q in gold_by_qid if q not in preds]
    if absent and missing == "error":
        raise ValueError(
            f"{len(absent)} record(s) have no prediction, e.g. qids {absent[:5]} "
            "(pass missing='wrong' to count them wrong)"
        )

    groups: dict[str, list[bool]] = {k: [] for k in ("open", "closed", "yn_open", "yn_closed")}
    by_type: dict[str, list[bool]] = {}
    yes_no_pairs: list[tuple[str, str]] = []
    token_sums = [0.0, 0.0, 0.0, 0.0]
    n_open = 0
    everything: list[bool] = []
    for qid, rec in gold_by_qid.items():
        gold = normalize_answer(_get(rec, "answer"))
        pred = normalize_answer(preds.get(qid, ""))
        ok = qid in preds and pred == gold
        everything.append(ok)
        closed = str(_get(rec, "answer_type")).strip().upper() == "CLOSED"
        groups["closed" if closed else "open"].append(ok)
        yes_no = gold in ("yes", "no")
        groups["yn_closed" if yes_no else "yn_open"].append(ok)
        by_type.setdefault(str(_get(rec, "content_type")), []).append(ok)
        if yes_no:
            yes_no_pairs.append((pred, gold))
        if not closed:
            n_open += 1
            for i, value in enumerate(_token_scores(pred, gold)):
                token_sums[i] += value

    def mean(i: int) -> float | None:
        return 100 * token_sums[i] / n_open if n_open else None

    return {
        "n": len(everything),
        "open": _accuracy(groups["open"]),
        "closed": _accuracy(groups["closed"]),
        "global": _accuracy(everything),
        "yes_no": {
            "open": _accuracy(groups["yn_open"]),
            "closed": _accuracy(groups["yn_closed"]),
            "global": _accuracy(everything),
        },
        "closed_prf": _yes_no_prf(yes_no_pairs),
        "open_tokens": {
            "n": n_open,
            "precision": mean(0),
            "recall": mean(1),
            "f1": mean(2),
            "bleu1": mean(3),
        },
        "content_types": {k: _accuracy(v) for k, v in sorted(by_type.items())},
        "missing": len(absent),
        "missing_qids": absent[:20],
    }


def _most_common(counter: Counter) -> str:
    # ties broken alphabetically so a baseline never depends on record order
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def majority_baseline(train: Sequence[Any], test: Sequence[Any]) -> dict[str, Any]:
    """Metrics of answering every test question with the most frequent (normalised) training answer."""
    answer = _most_common(Counter(normalize_answer(_get(r, "answer")) for r in train))
    metrics = compute_metrics({_get(r, "qid"): answer for r in test}, test)
    return {"baseline": "majority", "prediction": answer, **metrics}


def question_only_baseline(train: Sequence[Any], test: Sequence[Any]) -> dict[str, Any]:
    """Metrics of a model that sees only the question: the most frequent training answer to the same
    (normalised) question text, else the overall majority. An upper bound on what text alone gives here."""
    per_question: dict[str, Counter] = {}
    for r in train:
        per_question.setdefault(normalize_answer(_get(r, "question")), Counter())[
            normalize_answer(_get(r, "answer"))
        ] += 1
    fallback = _most_common(Counter(normalize_answer(_get(r, "answer")) for r in train))
    preds, seen = {}, 0
    for r in test:
        counter = per_question.get(normalize_answer(_get(r, "question")))
        seen += counter is not None
        preds[_get(r, "qid")] = _most_common(counter) if counter else fallback
    metrics = compute_metrics(preds, test)
    return {"baseline": "question-only", "seen_questions": 100 * seen / len(test) if test else 0.0, **metrics}

"""Med-VQA metrics in percent, matched by ``qid`` (never list order), with Wilson 95 % intervals; floors; McNemar.
"Closed" is reported both ways: ``answer_type == "CLOSED"`` (the datasets' label) -> ``open/closed/global``; a
yes/no gold answer (the MILE paper's tables: 355 of SLAKE's 1,061 English test questions) -> ``yes_no``."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_answer(text: Any) -> str:
    """Lower case, punctuation -> space, articles removed unless the answer is nothing else ("A" -> "a")."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join([w for w in words if w not in ("a", "an", "the")] or words)


def _accuracy(flags: Sequence[bool], z: float = 1.959963984540054) -> dict[str, Any]:
    """Accuracy with its Wilson 95 % interval (sane at 0 and 100 %); scipy's rounds the last digit differently."""
    n, c = len(flags), int(sum(flags))
    if n == 0:
        return {"accuracy": None, "n": 0, "correct": 0, "ci_low": 0.0, "ci_high": 100.0}
    p, denom = c / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / denom, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"accuracy": 100 * c / n, "n": n, "correct": c, "ci_low": 100 * max(0.0, centre - half),
            "ci_high": 100 * min(1.0, centre + half)}


def _token_scores(pred: str, gold: str) -> tuple[float, ...]:
    """Token precision, recall, F1 and BLEU-1 (fractions)."""
    p_tok, g_tok = pred.split(), gold.split()
    if not g_tok or not p_tok:
        return (float(not p_tok and not g_tok),) * 4
    overlap = sum((Counter(p_tok) & Counter(g_tok)).values())  # clipped counts, as BLEU does
    precision, recall = overlap / len(p_tok), overlap / len(g_tok)
    f1 = 2 * precision * recall / (precision + recall) if overlap else 0.0
    return precision, recall, f1, precision * min(1.0, math.exp(1 - len(g_tok) / len(p_tok)))


def _yes_no_prf(gold: list[str], pred: list[str]) -> dict[str, Any]:
    """P/R/F1 with "yes" positive over yes/no gold answers, from scikit-learn's confusion matrix; other predictions
    are just wrong. F1 is the harmonic mean of P and R (scikit-learn's own formula rounds the last digit otherwise)."""
    from sklearn.metrics import confusion_matrix
    labels, pred = ["yes", "no", "other"], [p if p in ("yes", "no") else "other" for p in pred]
    matrix = confusion_matrix(gold, pred, labels=labels)[:2].tolist() if gold else [[0] * 3, [0] * 3]
    (tp, fn_no, fn_other), (fp, tn, _) = matrix
    p, r = tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn_no + fn_other) if tp + fn_no + fn_other else 0.0
    return {"precision": 100 * p, "recall": 100 * r, "f1": 100 * (2 * p * r / (p + r)) if p + r else 0.0,
            "n": len(gold), "tp": tp, "fp": fp, "fn": fn_no + fn_other, "tn": tn,
            "confusion": {"gold": labels[:2], "predicted": labels, "matrix": matrix}}


def compute_metrics(predictions: Mapping[Any, Any] | Iterable[Mapping[str, Any]], records: Sequence[Any]) -> dict:
    """Metrics of ``predictions`` (qid -> answer, or rows with ``qid``, ``prediction``) on ``records``, qids matched as
    strings, each exactly once. ``open_tokens``: mean token P/R/F1 and BLEU-1 over OPEN questions."""
    rows = [{"qid": k, "prediction": v} for k, v in predictions.items()] if isinstance(predictions, Mapping) \
        else predictions
    preds: dict[str, str] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "qid" not in row or "prediction" not in row or str(row["qid"]) in preds:
            raise ValueError(f"prediction {i}: expected a mapping with 'qid' and 'prediction', each qid predicted "
                             f"once; got {row!r}")
        preds[str(row["qid"])] = "" if row["prediction"] is None else str(row["prediction"])
    gold_by_qid = {str(rec.qid): rec for rec in records}
    if len(gold_by_qid) < len(records):  # a duplicate: counted only then
        twice = [q for q, n in Counter(str(rec.qid) for rec in records).items() if n > 1]
        raise ValueError(f"records: qid {twice[0]!r} appears twice; metrics match by qid")
    if unknown := [q for q in preds if q not in gold_by_qid]:
        raise ValueError(f"{len(unknown)} prediction(s) for qids not in the records, e.g. {unknown[:5]}")
    if absent := [q for q in gold_by_qid if q not in preds]:
        raise ValueError(f"{len(absent)} record(s) have no prediction, e.g. qids {absent[:5]}")
    groups: dict[str, list[bool]] = defaultdict(list)
    yes_no: list[tuple[str, str]] = []
    sums, n_open = [0.0] * 4, 0  # token scores added in record order, as ever (sum() may round differently)
    for qid, rec in gold_by_qid.items():
        gold, pred = normalize_answer(rec.answer), normalize_answer(preds[qid])
        closed, yn = str(rec.answer_type).strip().upper() == "CLOSED", gold in ("yes", "no")
        for group in ("closed" if closed else "open", "yn_closed" if yn else "yn_open", "global",
                      "type:" + str(rec.content_type)):
            groups[group].append(pred == gold)
        yes_no += [(gold, pred)] if yn else []
        if not closed:
            sums, n_open = [a + b for a, b in zip(sums, _token_scores(pred, gold), strict=True)], n_open + 1
    mean = [100 * total / n_open if n_open else None for total in sums]
    acc = {k: _accuracy(groups[k]) for k in ("open", "closed", "yn_open", "yn_closed", "global", *groups)}
    return {"n": len(groups["global"]), "open": acc["open"], "closed": acc["closed"], "global": acc["global"],
            "yes_no": {"open": acc["yn_open"], "closed": acc["yn_closed"], "global": acc["global"]},
            "closed_prf": _yes_no_prf([g for g, _ in yes_no], [p for _, p in yes_no]),
            "open_tokens": {"n": n_open, "precision": mean[0], "recall": mean[1], "f1": mean[2], "bleu1": mean[3]},
            "content_types": {k[5:]: v for k, v in sorted(acc.items()) if k.startswith("type:")}}


def _most_common(answers: Iterable[str]) -> str:
    return min(Counter(answers).items(), key=lambda kv: (-kv[1], kv[0]))[0]  # ties alphabetical: order-independent


def majority_baseline(train: Sequence[Any], test: Sequence[Any]) -> dict[str, Any]:
    """Metrics (and ``predictions``) of always giving the most frequent training answer."""
    answer = _most_common(normalize_answer(r.answer) for r in train)
    preds = {r.qid: answer for r in test}
    return {"baseline": "majority", "prediction": answer, "predictions": preds, **compute_metrics(preds, test)}


def question_only_baseline(train: Sequence[Any], test: Sequence[Any]) -> dict[str, Any]:
    """Metrics of the commonest training answer to the same question text (else the majority): the text alone."""
    per_question: dict[str, list[str]] = defaultdict(list)
    for r in train:
        per_question[normalize_answer(r.question)].append(normalize_answer(r.answer))
    fallback = [_most_common(normalize_answer(r.answer) for r in train)]
    preds = {r.qid: _most_common(per_question.get(normalize_answer(r.question), fallback)) for r in test}
    seen = 100 * sum(normalize_answer(r.question) in per_question for r in test) / len(test) if test else 0.0
    return {"baseline": "question-only", "seen_questions": seen, "predictions": preds, **compute_metrics(preds, test)}


def mcnemar(a_correct: Mapping[Any, bool], b_correct: Mapping[Any, bool]) -> dict[str, Any]:
    """Exact McNemar test of two systems (``qid -> right?``, a dict or pd.Series): ``b`` questions only A answers
    right, ``c`` only B; ``p`` the two-sided binomial test of b of b + c at 1/2 (1.0 when b + c = 0)."""
    from scipy.stats import binomtest
    if set(a_correct.keys()) != set(b_correct.keys()):
        raise ValueError(f"mcnemar: the two systems answered different questions ({len(a_correct)} vs "
                         f"{len(b_correct)} qids); a paired test needs the same ones")
    b = sum(bool(a_correct[q]) and not b_correct[q] for q in a_correct.keys())
    c = sum(bool(b_correct[q]) and not a_correct[q] for q in a_correct.keys())
    return {"n": len(a_correct), "b": b, "c": c, "p": float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0}

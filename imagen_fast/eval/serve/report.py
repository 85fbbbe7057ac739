"""The study's results: rater screening, preference rates and alignment scores.

Raters: accuracy on the control trials they answered; kept when it is at least the
study's ``min_control_accuracy`` (0.8) and they answered at least one control. Only
kept raters' answers to real questions count.

A/B tasks, per system pair: the shares of answers preferring A, preferring B and
indifferent, each with a 95% Wilson score interval (binomial, good at small n and near
0 or 1, unlike the normal approximation). ``preference_a`` = (A + indifferent / 2) / n,
the paper's convention of splitting ties, with a percentile bootstrap interval.

Alignment, per system: the mean score (yes 100, somewhat 50, no 0) with a 95%
percentile bootstrap interval (resampling answers; 2000 resamples, seeded), and the
share of each answer.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .study import ALIGNMENT_SCORES, QUESTIONS

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes: {successes} outside [0, {n}]")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_interval(values: Sequence[float], seed: int = 0,
                            resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
                            ) -> Tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def rater_screening(rows, min_accuracy: float) -> Dict[int, dict]:
    out: Dict[int, dict] = {}
    for r in rows:
        s = out.setdefault(r["rater"], {"name": r["name"], "answers": 0, "controls": 0,
                                        "correct": 0})
        s["answers"] += 1
        if r["control"]:
            s["controls"] += 1
            s["correct"] += int(r["answer"] == r["expected"])
    for s in out.values():
        s["control_accuracy"] = s["correct"] / s["controls"] if s["controls"] else None
        s["kept"] = bool(s["controls"]) and s["control_accuracy"] >= min_accuracy
    return out


def _share(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"count": k, "rate": k / n if n else float("nan"), "ci95": [lo, hi]}


def build_report(store) -> dict:
    cfg = store.config()
    rows = store.answered()
    raters = rater_screening(rows, cfg["min_control_accuracy"])
    kept = {rid for rid, s in raters.items() if s["kept"]}
    ab: Dict[Tuple[str, str, str], List[str]] = defaultdict(list)
    align: Dict[str, List[str]] = defaultdict(list)
    for r in rows:
        if r["control"] or r["rater"] not in kept:
            continue
        if r["kind"] == "alignment":
            align[r["system_a"]].append(r["answer"])
        else:
            ab[(r["kind"], r["system_a"], r["system_b"])].append(r["answer"])
    ab_out = []
    for (kind, a, b), answers in sorted(ab.items()):
        n = len(answers)
        ka, kb = answers.count("a"), answers.count("b")
        ki = n - ka - kb
        ties_split = [1.0 if x == "a" else 0.5 if x == "indifferent" else 0.0 for x in answers]
        ab_out.append({"task": kind, "question": QUESTIONS[kind], "system_a": a, "system_b": b,
                       "n": n, "a": _share(ka, n), "b": _share(kb, n),
                       "indifferent": _share(ki, n),
                       "preference_a": {"rate": float(np.mean(ties_split)),
                                        "ci95": list(bootstrap_mean_interval(ties_split))}})
    align_out = []
    for system, answers in sorted(align.items()):
        scores = [ALIGNMENT_SCORES[x] for x in answers]
        lo, hi = bootstrap_mean_interval(scores)
        align_out.append({"system": system, "question": QUESTIONS["alignment"], "n": len(scores),
                          "score": float(np.mean(scores)), "ci95": [lo, hi],
                          **{x: _share(answers.count(x), len(answers)) for x in ALIGNMENT_SCORES}})
    all_raters = store.raters()
    return {"config": cfg, "source": store.meta("source"),
            "raters": {"total": len(all_raters), "with_answers": len(raters), "kept": len(kept),
                       "details": [{"rater": rid, **s} for rid, s in sorted(raters.items())]},
            "ab": ab_out, "alignment": align_out,
            "intervals": "A/B shares: 95% Wilson score; preference_a (ties split) and alignment "
                         "means: 95% percentile bootstrap, 2000 resamples"}


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_report(rep: dict) -> str:
    r = rep["raters"]
    lines = [f"study: {rep['source']}",
             f"raters: {r['total']} started, {r['with_answers']} answered, {r['kept']} kept "
             f"(control accuracy >= {_pct(rep['config']['min_control_accuracy']).strip()})"]
    for d in r["details"]:
        acc = "no controls" if d["control_accuracy"] is None else \
            f"controls {d['correct']}/{d['controls']}"
        lines.append(f"  rater {d['rater']} {d['name'] or '-'}: {d['answers']} answers, {acc}, "
                     f"{'kept' if d['kept'] else 'dropped'}")
    for x in rep["ab"]:
        lines.append(f"{x['task']}: {x['question']}  ({x['n']} answers)")
        for key, label in (("a", x["system_a"]), ("b", x["system_b"]), ("indifferent", "indifferent")):
            s = x[key]
            lines.append(f"  {label:24s} {_pct(s['rate'])}  [{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}]")
        p = x["preference_a"]
        lines.append(f"  {x['system_a']} preferred, ties split: {_pct(p['rate'])}  "
                     f"[{_pct(p['ci95'][0])}, {_pct(p['ci95'][1])}]")
    for x in rep["alignment"]:
        lines.append(f"alignment {x['system']}: {x['score']:.1f} / 100  [{x['ci95'][0]:.1f}, "
                     f"{x['ci95'][1]:.1f}]  ({x['n']} answers; yes {_pct(x['yes']['rate'])}, "
                     f"somewhat {_pct(x['somewhat']['rate'])}, no {_pct(x['no']['rate'])})")
    if not rep["ab"] and not rep["alignment"]:
        lines.append("no answers from kept raters yet")
    lines.append(f"intervals: {rep['intervals']}")
    return "\n".join(lines)

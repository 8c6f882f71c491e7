"""The demo pipeline end to end at toy size: JSONL, PNG and a verdict line."""

import json

import pytest

from sdpo.demo import DemoSettings, reward_exact, run_demo, verdict


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
    assert verdict(rows).startswith("VERDICT: SDPO ahead by 0.40 mean held-out accuracy, ahead in 1/1 seeds")


def test_verdict_follows_the_data_across_seeds():
    assert verdict(_rows({"sdpo": [0.2, 0.3, 0.2], "grpo": [0.5, 0.6, 0.4]})).startswith("VERDICT: GRPO ahead by 0.27")
    # a large mean gap carried by one seed only is not a clear difference
    line = verdict(_rows({"sdpo": [0.9, 0.3, 0.2], "grpo": [0.2, 0.3, 0.3]}))
    assert line.startswith("VERDICT: no clear difference") and "SDPO ahead in 1/3 seeds" in line
    assert verdict(_rows({"sdpo": [0.31, 0.3], "grpo": [0.3, 0.31]})).startswith("VERDICT: no clear difference")


@pytest.mark.slow
def test_demo_runs_and_writes_outputs(tmp_path):
    out = tmp_path / "demo"
    line = run_demo(DemoSettings(out=str(out), warmup_steps=10, rl_steps=2, eval_every=1, num_seeds=2))
    assert line.startswith("VERDICT:") and "/2 seeds" in line
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    methods = {r.get("method") for r in rows}
    assert {"warmup", "sdpo", "grpo"} <= methods
    assert {r["seed"] for r in rows if "seed" in r} == {0, 1}
    warm = [r for r in rows if r.get("method") == "warmup"]
    assert all(0.0 <= r["train_sampled_success"] <= 1.0 for r in warm)
    assert rows[-1]["verdict"] == line
    env = rows[0]["versions"]  # the run records what it ran with
    assert {"torch", "transformers", "trl", "triton"} <= set(env) and env["torch"].startswith("2.")
    assert (out / "curves.png").stat().st_size > 1000

"""The demo pipeline end to end at toy size: JSONL, PNG and a verdict line."""

import json

import pytest

from sdpo.demo import DemoSettings, reward_exact, run_demo, verdict


def test_reward_and_verdict():
    assert reward_exact(["cba", " cb", "cba\n"], ["cba", "cba", "cba"]) == [1.0, 0.0, 1.0]
    rows = [
        {"method": "sdpo", "step": 0, "heldout_accuracy": 0.1},
        {"method": "sdpo", "step": 1, "reward": 0.5, "heldout_accuracy": 0.6},
        {"method": "grpo", "step": 0, "heldout_accuracy": 0.1},
        {"method": "grpo", "step": 1, "reward": 0.2, "heldout_accuracy": 0.2},
    ]
    line = verdict(rows)
    assert line.startswith("VERDICT: SDPO ahead by 0.40")


@pytest.mark.slow
def test_demo_runs_and_writes_outputs(tmp_path):
    out = tmp_path / "demo"
    line = run_demo(DemoSettings(out=str(out), warmup_steps=10, rl_steps=2, eval_every=1))
    assert line.startswith("VERDICT:")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    methods = {r.get("method") for r in rows}
    assert {"warmup", "sdpo", "grpo"} <= methods
    assert rows[-1]["verdict"] == line
    assert (out / "curves.png").stat().st_size > 1000

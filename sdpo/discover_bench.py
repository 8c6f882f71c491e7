"""The offline discovery benchmark behind `sdpo discover` (docs/discover.md).

For each model seed (one process per seed, in parallel): build and warm up the tiny model
(`sdpo.discover_task`), select its hard held-out questions, then for every question, run seed and method call
`sdpo.discover.discover` from the same warmed-up weights. Run seeds are shared by the methods (same sampler
stream). Writes `discovery.json` (settings, versions, per-question results, curves, bands, ratios, verdict,
wall time) and `discovery.png`, and prints the verdict line.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .discover import METHODS, DiscoverConfig, discover
from .discover_stats import analyse, plot, verdict
from .discover_task import (
    TaskSettings,
    build_task_model,
    feedback_lift,
    make_verifier,
    reverse_prompt,
    select_questions,
)


@dataclass
class BenchSettings:
    """The measurement: model seeds x hard questions x run seeds, every method on each (same budget/sampler)."""

    out: str = "discover_out"
    methods: tuple[str, ...] = METHODS
    seed: int = 0  # first model seed
    num_seeds: int = 4  # model seeds: each its own split, init, warm-up and questions
    questions: int = 10  # hard questions per model seed (fewer when fewer qualify)
    runs_per_question: int = 4  # sampling seeds per question and method
    target_p: float = 0.5
    bootstrap_samples: int = 2000
    workers: int = 0  # processes over model seeds; 0: one per usable core
    threads: int = 1  # torch intra-op threads per process: a 64-wide model gains nothing from more
    task: TaskSettings = field(default_factory=TaskSettings)
    config: DiscoverConfig = field(default_factory=DiscoverConfig)


def run_seed(s: BenchSettings, model_seed: int) -> dict:
    """Warm-up, question selection and every (question, run, method) for one model seed."""
    start = time.time()
    torch.manual_seed(model_seed)
    model, tok, _train, held_out = build_task_model(s.task, model_seed)
    warm = time.time() - start
    questions, rates = select_questions(model, tok, held_out, s.task, s.questions, model_seed)
    lifted = feedback_lift(model, tok, questions, s.task, model_seed)
    records = []
    for qi, (q, rate) in enumerate(zip(questions, rates)):
        verifier = make_verifier(q[::-1])
        for r in range(s.runs_per_question):
            run_seed_value = (model_seed * 1_000_003 + qi * 1009 + r) % (1 << 62)
            for m in s.methods:
                res = discover(model, tok, reverse_prompt(q), verifier, m, s.config, run_seed_value)
                records.append(
                    {
                        "model_seed": model_seed,
                        "question": q,
                        "selection_pass_rate": rate,
                        "run": r,
                        "method": m,
                        "first_success": res.first_success,
                        "attempts_used": res.attempts_used,
                        "rounds": res.rounds,
                        "sdpo_steps": res.sdpo_steps,
                        "seconds": round(res.seconds, 3),
                    }
                )
    return {
        "model_seed": model_seed,
        "questions": questions,
        "selection_pass_rates": rates,
        "pass_rates_after_one_feedback": lifted,
        "warmup_seconds": round(warm, 1),
        "seconds": round(time.time() - start, 1),
        "records": records,
    }


def _worker(s: BenchSettings, model_seed: int) -> dict:
    from .runtime import limit_threads, quiet_libraries

    limit_threads(s.threads)
    quiet_libraries()
    return run_seed(s, model_seed)


def per_question_table(records: list[dict], methods: tuple[str, ...]) -> dict[str, list[list[int | None]]]:
    """{method: [[first_success per run] per question]} with the questions in one shared order."""
    keys = sorted({(r["model_seed"], r["question"]) for r in records})
    table: dict[str, list[list[int | None]]] = {m: [[] for _ in keys] for m in methods}
    index = {k: i for i, k in enumerate(keys)}
    for r in sorted(records, key=lambda r: (r["model_seed"], r["question"], r["run"])):
        table[r["method"]][index[(r["model_seed"], r["question"])]].append(r["first_success"])
    return table


def run_benchmark(s: BenchSettings | None = None) -> str:
    """Run the whole benchmark; returns (and prints) the verdict line."""
    import concurrent.futures
    import multiprocessing

    from .runtime import default_workers, quiet_libraries, versions

    s = s or BenchSettings()
    os.makedirs(s.out, exist_ok=True)
    quiet_libraries()
    start = time.time()
    seeds = list(range(s.seed, s.seed + s.num_seeds))
    workers = s.workers or default_workers(len(seeds))
    env = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print(f"{len(seeds)} model seeds x {s.questions} questions x {s.runs_per_question} runs x {list(s.methods)}")
    if workers == 1:
        results = [_worker(s, k) for k in seeds]
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch/OpenMP state
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, s, k) for k in seeds]
            results = []
            for k, fut in zip(seeds, futures):
                results.append(fut.result())
                print(f"model seed {k} done at {time.time() - start:.0f}s", flush=True)
    records = [r for res in results for r in res["records"]]
    table = per_question_table(records, s.methods)
    analysis = analyse(table, s.config.budget, s.target_p, s.bootstrap_samples)
    line = verdict(analysis, s.runs_per_question)
    wall = round(time.time() - start, 1)
    payload = {
        "verdict": line,
        "wall_seconds": wall,
        "versions": env,
        "settings": asdict(replace(s)),
        "analysis": analysis,
        "seeds": [{k: v for k, v in res.items() if k != "records"} for res in results],
        "records": records,
    }
    with open(os.path.join(s.out, "discovery.json"), "w") as f:
        json.dump(payload, f, indent=1)
    plot(analysis, os.path.join(s.out, "discovery.png"))
    print(f"wrote {s.out}/discovery.json and {s.out}/discovery.png in {wall:.0f}s")
    print(line)
    return line

"""Fuzzed request bodies against the offline demo: every route, streamed and not, every request field.

    flock /tmp/rayfit-ray.lock .venv/bin/python benchmarks/bench_fuzz.py             # 5,000 bodies
    flock /tmp/rayfit-ray.lock .venv/bin/python benchmarks/bench_fuzz.py --bodies 500 --seed 2
    .venv/bin/python benchmarks/bench_fuzz.py --replay old/bench_fuzz.json --out /tmp/replayed   # a fix, checked

Serves the offline demo the way `python -m deployments.demo` does (a local Ray, examples/demo's
serve config and models, on a free port) with one change: each model's `max_tokens_cap` is
`--cap` (4), which is also the max_tokens of a body that names none, so the valid bodies among
thousands cost a few tokens each on 2 cores. Sends, one at a time, the bodies of the test suite's
generator (tests/test_reliability.py `fuzz_cases`: chat, completions and responses, streamed and
not; valid bodies, bodies with one field the API must refuse, bodies with one field set to any
JSON or to text with lone surrogates, junk) and checks every answer with the suite's
`answer_problems`: never a 5xx, every error in OpenAI's shape, every refused field named in
`error.param`, every valid body answered 200 (a stream ending with its last event, no error inside).

Reports per route and kind: bodies, 2xx, 4xx, 5xx and problems, the first 5xx bodies and the first
problems. Writes benchmarks/results/bench_fuzz.{md,json}; exit status 1 when any answer has a problem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the generator and the checks are the test suite's

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from test_reliability import ROUTES, FuzzCase, answer_problems, fuzz_cases  # noqa: E402

from deployments.demo import DEFAULT_CONFIG, serve_config, start_ray  # noqa: E402

ROLES = ["summarizer", "buffer_agent"]
VOCAB = 49152  # SmolLM2's vocabulary; Gemma 3's is larger: ids below this are both models'
KINDS = ("valid", "invalid", "odd", "junk")


def capped_demo_config(directory: Path, cap: int) -> Path:
    """examples/demo's serve config, its models each with `max_tokens_cap: cap`."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = config["applications"][0]
    models = yaml.safe_load((REPO_ROOT / app["args"]["model_config"]).read_text())
    for spec in models.values():
        spec["max_tokens_cap"] = cap
    (directory / "model_configs.yaml").write_text(yaml.safe_dump(models))
    app["args"]["model_config"] = str(directory / "model_configs.yaml")
    path = directory / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Tally:
    """Every answer counted by route, kind and status class; the 5xx and the problems kept with their bodies."""

    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=60)
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.problems: list[dict[str, Any]] = []
        self.server_errors: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def send(self, case: FuzzCase) -> None:
        try:
            response = self.client.post(case.path, content=case.body, headers={"content-type": "application/json"})
            status, text = response.status_code, response.text
        except httpx.HTTPError as exc:  # a hang or a dropped connection: a problem, counted as a 5xx
            status, text = 599, f"{type(exc).__name__}: {exc}"
        self.counts[(case.route, case.kind, f"{status // 100}xx")] += 1
        try:
            found = answer_problems(case, status, text)
        except Exception as exc:  # a check that cannot read the answer: a problem too, and the run goes on
            found = [f"answer not checkable: {type(exc).__name__}: {exc}"]
        record = {
            "route": case.route,
            "kind": case.kind,
            "field": case.field,
            "status": status,
            "body": case.body.decode(errors="replace"),
        }
        if status >= 500:
            self.server_errors.append({**record, "answer": text[:2000]})
        if found:
            self.problems.append({**record, "problems": found, "answer": text[:600]})
        done = sum(self.counts.values())
        if done % 500 == 0:
            seconds = time.perf_counter() - self.started
            print(f"{done} bodies, {seconds:.0f} s, {len(self.problems)} problems", flush=True)

    def result(self) -> dict[str, Any]:
        self.client.close()
        return {
            "counts": {"|".join(key): n for key, n in sorted(self.counts.items())},
            "seconds": round(time.perf_counter() - self.started, 1),
            "problems": self.problems,
            "server_errors": self.server_errors,
        }


def run(url: str, bodies: int, seed_value: int, cap: int) -> dict[str, Any]:
    """`bodies` fuzzed bodies from the suite's generator, one at a time."""
    tally = Tally(url)

    @seed(seed_value)
    @settings(
        max_examples=bodies,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_cases(dict.fromkeys(ROLES, cap), vocab=VOCAB))
    def send(case: FuzzCase) -> None:
        tally.send(case)

    send()
    return tally.result()


def replay(url: str, earlier: Path) -> dict[str, Any]:
    """The bodies an earlier run found problems with (its bench_fuzz.json), sent again."""
    tally = Tally(url)
    for record in json.loads(earlier.read_text())["problems"]:
        body = record["body"].encode()
        try:
            stream = bool(json.loads(body).get("stream"))
        except (ValueError, AttributeError):  # junk: not a JSON object
            stream = False
        tally.send(FuzzCase(record["route"], body, record["kind"], record.get("field"), stream))
    return tally.result()


def table(result: dict[str, Any]) -> list[str]:
    counts = {tuple(key.split("|")): n for key, n in result["counts"].items()}
    problem_counts = Counter((p["route"], p["kind"]) for p in result["problems"])
    lines = ["| route | kind | bodies | 2xx | 4xx | 5xx | problems |", "|---|---|---:|---:|---:|---:|---:|"]
    for route in [*ROUTES, "all"]:
        for kind in [*KINDS, "all"]:
            if route == "all" and kind != "all":
                continue

            def n(klass: str | None, route: str = route, kind: str = kind) -> int:
                return sum(
                    count
                    for (r, k, c), count in counts.items()
                    if route in (r, "all") and kind in (k, "all") and klass in (c, None)
                )

            bad = sum(v for (r, k), v in problem_counts.items() if route in (r, "all") and kind in (k, "all"))
            name = f"**{route}**" if kind == "all" else route
            lines.append(f"| {name} | {kind} | {n(None)} | {n('2xx')} | {n('4xx')} | {n('5xx')} | {bad} |")
    return lines


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    total = sum(result["counts"].values())
    command = f"--replay {args.replay}" if args.replay else f"--bodies {args.bodies} --seed {args.seed}"
    lines = [
        "# Fuzzed bodies against the offline demo",
        "",
        f"`benchmarks/bench_fuzz.py {command} --cap {args.cap}`: {total} bodies "
        f"in {result['seconds']} s, one at a time ({platform.machine()}, {os.cpu_count()} CPUs; "
        f"roles {', '.join(ROLES)}, max_tokens_cap {args.cap}).",
        "",
        "Kinds: valid (must be 200), invalid (one field the API must refuse: a 4xx naming it), "
        "odd (one field set to any JSON, or text with lone surrogates: anything but a 5xx), junk (not a body).",
        "",
        *table(result),
        "",
    ]
    if result["server_errors"]:
        lines += ["## First 5xx bodies", ""]
        for error in result["server_errors"][:5]:
            lines += [f"- {error['route']} ({error['kind']}) {error['status']}: `{error['body'][:400]}`", ""]
    if result["problems"]:
        lines += ["## First problems", ""]
        for problem in result["problems"][:10]:
            lines += [f"- {problem['route']} ({problem['kind']}): {problem['problems'][0][:300]}", ""]
    else:
        lines += [
            "No problems: no 5xx, every error in OpenAI's shape naming the refused field, every valid body answered."
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bodies", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1, help="hypothesis seed: the same bodies for the same seed")
    parser.add_argument("--cap", type=int, default=4, help="each model's max_tokens_cap")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--replay", type=Path, help="an earlier run's bench_fuzz.json: send its problem bodies again, and only those"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    start_ray(verbose=False)
    try:
        with tempfile.TemporaryDirectory() as directory:
            url, _ = serve_config(capped_demo_config(Path(directory), args.cap), 0)
            if args.replay:
                print(f"demo serving at {url}; replaying the problem bodies of {args.replay}", flush=True)
                result = replay(url, args.replay)
            else:
                print(f"demo serving at {url}; sending {args.bodies} bodies", flush=True)
                result = run(url, args.bodies, args.seed, args.cap)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = markdown(result, args)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fuzz.md").write_text(report)
    (args.out / "bench_fuzz.json").write_text(json.dumps({"args": vars(args), **result}, indent=1, default=str))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

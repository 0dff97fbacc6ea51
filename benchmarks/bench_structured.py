"""Constrained decoding's cost: tok/s with and without a JSON schema, in one run.

    .venv/bin/python benchmarks/bench_structured.py                  # ~12 min on 2 shared cores
    .venv/bin/python benchmarks/bench_structured.py --requests 4 --max-tokens 64

Serves the offline demo the way `python -m deployments.demo` does (a local
Ray, examples/demo/serve_config.yaml, on a free port) and sends closed-loop
chat completions to `summarizer` (SmolLM2-135M) at concurrency 1 and 8, same
prompt and max_tokens, temperature 0 and unset (OpenAI's default 1.0), in
three shapes:

- plain: no rules at all (what most requests are);
- plain + ignore_eos: EOS masked, so every answer runs to max_tokens (the
  same token count as the schema side, through the same logits hook);
- schema: `response_format` json_schema (strict) whose shortest valid answer
  is longer than max_tokens (an array of at least 20 objects), so the grammar
  never ends an answer early and every answer runs to max_tokens too.

tok/s = completion tokens from `usage` ÷ wall time of the cell; the mean
completion tokens per request is printed next to each cell. Cells alternate
shapes, and each cell runs `--rounds` times interleaved (ABCABC...) so drift
on a shared box hits all shapes alike. The cost is schema / (plain +
ignore_eos), same token counts through the same hook (target: schema at most
10% slower, ratio ≥ 0.90), over all rounds and as the median of the rounds'
own ratios (neighbouring cells, so less hit by load swings); schema / plain is
shown too.

Before serving, the logits hook alone is timed in this process (low noise:
CPU time of this thread): `BatchRowsProcessor` with 1 and 8 rows under the
schema on the demo tokenizer, random scores, each row taking the argmax of
its masked scores (always a valid token), per decode step, the best of 5
runs of 64 steps. Next to the served c=8 step time (8 ÷ tok/s) it bounds
what the grammar can cost there.

Caveat (measured on Ray 2.60): Ray starts every worker process, so the model
replica, at nice 15; this client runs at nice 0.

Writes `benchmarks/results/bench_structured.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import run_concurrent  # noqa: E402
from served_demo import smollm2_dir, start_demo, stop_demo  # noqa: E402

ROLE = "summarizer"
PROMPT = "List twenty people with their name, age and city, as JSON."
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 20}},
    "required": ["people"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA, "strict": True}}
SHAPES: dict[str, dict[str, Any]] = {
    "plain": {},
    "plain + ignore_eos": {"ignore_eos": True},
    "schema": {"response_format": RESPONSE_FORMAT},
}
TEMPERATURES: dict[str, dict[str, Any]] = {"temperature 0": {"temperature": 0}, "temperature unset": {}}


def hook_step_ms(rows: int, steps: int = 64, repeats: int = 5) -> float:
    """CPU ms per decode step of the continuous batch's logits hook with `rows` schema rows."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from deployments.engine.row_logits import BatchRowsProcessor, RowFactory
    from deployments.engine.rules import RowRules
    from deployments.engine.structured import response_format_grammar

    torch.set_num_threads(1)  # a replica's one torch thread
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab = AutoConfig.from_pretrained(directory).vocab_size
    factory = RowFactory(tokenizer, [tokenizer.eos_token_id])
    grammar = response_format_grammar(RESPONSE_FORMAT)
    best = float("inf")
    for _ in range(repeats):
        hook = BatchRowsProcessor()
        row_rules = [factory.row(RowRules(grammar=grammar)) for _ in range(rows)]
        keys = torch.tensor([hook.register(row) for row in row_rules if row is not None], dtype=torch.int32)
        generated: list[list[int]] = [[] for _ in range(rows)]
        scores_source = torch.Generator().manual_seed(0)
        spent = 0.0
        for _ in range(steps):
            scores = torch.randn(rows, vocab, generator=scores_source)
            start = time.thread_time()
            for row, tokens in zip(row_rules, generated, strict=True):
                row.observe(tokens)  # what prepare_tensor_args does per row
            out = hook(scores, keys)
            spent += time.thread_time() - start
            for tokens, token in zip(generated, out.argmax(-1).tolist(), strict=True):
                tokens.append(token)
        best = min(best, spent / steps * 1e3)
    return best


def body(shape: dict[str, Any], temperature: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    return {
        "model": ROLE,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        **temperature,
        **shape,
    }


def closed_loop(url: str, payload: dict[str, Any], concurrency: int, per_client: int) -> dict[str, Any]:
    """`concurrency` clients each sending `per_client` requests back to back: tokens, wall s, errors."""
    local = threading.local()

    def work() -> dict[str, Any]:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        try:
            response = local.client.post(f"{url}/v1/chat/completions", json=payload, timeout=300)
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
            answer = response.json()
            text = answer["choices"][0]["message"]["content"]
            return {"tokens": int(answer["usage"]["completion_tokens"]), "text": text}
        except Exception as exc:  # counted, reported
            return {"error": f"{type(exc).__name__}: {exc}"}

    wall, results = run_concurrent(concurrency, per_client, work)
    ok = [r for r in results if "tokens" in r]
    return {
        "tokens": sum(r["tokens"] for r in ok),
        "requests": len(ok),
        "wall_s": wall,
        "errors": [r["error"] for r in results if "error" in r],
        "sample": ok[0]["text"] if ok else None,
    }


def markdown(cells: dict[str, dict[str, Any]], hook_ms: dict[int, float], args: argparse.Namespace) -> str:
    lines = [
        f"Constrained decoding's cost, {platform.node()} ({os.cpu_count()} CPUs), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; demo `{ROLE}` (SmolLM2-135M), closed loop, "
        f"max_tokens {args.max_tokens}, {args.requests} requests per client × {args.rounds} rounds; "
        "tok/s (mean completion tokens per request)",
        "",
        "| temperature | c | plain | plain + ignore_eos | schema | schema / (plain + ignore_eos) "
        "| same, median of the rounds' ratios | schema / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for temp in TEMPERATURES:
        for c in args.concurrency:
            row = {shape: cells[f"{temp}|{c}|{shape}"] for shape in SHAPES}
            shown = [f"{row[s]['tok_s']:.1f} ({row[s]['mean_tokens']:.0f})" for s in SHAPES]
            ratio = row["schema"]["tok_s"] / max(row["plain"]["tok_s"], 1e-9)
            ratio_ie = row["schema"]["tok_s"] / max(row["plain + ignore_eos"]["tok_s"], 1e-9)
            paired = statistics.median(
                a / max(b, 1e-9)
                for a, b in zip(row["schema"]["rounds_tok_s"], row["plain + ignore_eos"]["rounds_tok_s"], strict=True)
            )
            ratios = f" | {ratio_ie:.2f}× | {paired:.2f}× | {ratio:.2f}× |"
            lines.append(f"| {temp.split()[-1]} | {c} | " + " | ".join(shown) + ratios)
    errors = sum(len(cell["errors"]) for cell in cells.values())
    lines += ["", f"errors: {errors}", ""]
    c_max = max(args.concurrency)
    step_ms = 1e3 * c_max / max(cells[f"temperature 0|{c_max}|plain + ignore_eos"]["tok_s"], 1e-9)
    hook = ", ".join(f"{rows} row{'s' if rows > 1 else ''} {ms:.2f} ms" for rows, ms in hook_ms.items())
    lines += [
        f"logits hook per decode step, in-process (CPU time, best of 5 × 64 steps): {hook}; "
        f"the served c={c_max} step (greedy, plain + ignore_eos) took {step_ms:.0f} ms, so the "
        f"{c_max}-row hook is {100 * hook_ms.get(c_max, float('nan')) / step_ms:.1f}% of it",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every cell")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hook_ms = {rows: hook_step_ms(rows) for rows in sorted({1, *args.concurrency})}
    print("logits hook ms per step:", {rows: round(ms, 3) for rows, ms in hook_ms.items()}, flush=True)
    url = start_demo()
    totals: dict[str, dict[str, Any]] = {}
    try:
        for temp in TEMPERATURES.values():  # warm-up: compiles the schema once, touches every path
            for shape in SHAPES.values():
                closed_loop(url, body(shape, temp, args.max_tokens), 2, 1)
        for temp_name, temp in TEMPERATURES.items():
            for c in args.concurrency:
                per_client = args.requests * (2 if c == 1 else 1)
                for round_index in range(args.rounds):
                    for shape_name, shape in SHAPES.items():
                        key = f"{temp_name}|{c}|{shape_name}"
                        cell = closed_loop(url, body(shape, temp, args.max_tokens), c, per_client)
                        total = totals.setdefault(key, {"tokens": 0, "requests": 0, "wall_s": 0.0, "errors": []})
                        total["tokens"] += cell["tokens"]
                        total["requests"] += cell["requests"]
                        total["wall_s"] += cell["wall_s"]
                        total["errors"] += cell["errors"]
                        total.setdefault("rounds_tok_s", []).append(round(cell["tokens"] / cell["wall_s"], 2))
                        total.setdefault("sample", cell["sample"])
                        print(
                            f"{temp_name}, c={c}, {shape_name}, round {round_index + 1}: "
                            f"{cell['tokens'] / cell['wall_s']:.1f} tok/s ({cell['requests']} ok, "
                            f"{len(cell['errors'])} errors)",
                            flush=True,
                        )
                        for error in cell["errors"][:3]:
                            print(f"  error: {error}")
    finally:
        stop_demo()
    for total in totals.values():
        total["tok_s"] = total["tokens"] / max(total["wall_s"], 1e-9)
        total["mean_tokens"] = total["tokens"] / max(total["requests"], 1)
    report = markdown(totals, hook_ms, args)
    print("\n" + report)
    schema_sample = totals[f"{next(iter(TEMPERATURES))}|{args.concurrency[0]}|schema"]["sample"]
    print(f"a schema answer (cut at max_tokens): {schema_sample!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_structured.md").write_text(report)
    (args.out / "bench_structured.json").write_text(
        json.dumps(
            {"cells": totals, "hook_ms": hook_ms, "max_tokens": args.max_tokens, "schema": SCHEMA, "prompt": PROMPT},
            indent=1,
        )
    )
    return 1 if any(total["errors"] for total in totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

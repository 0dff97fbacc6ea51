"""Run each deliberate breakage (sitecustomize.py here) against the tests that must catch it.

    .venv/bin/python tests/breakages/run.py [NAME ...] [--clean] [--lock /tmp/rayfit-ray.lock]

For each breakage: its test selection runs in a fresh pytest with RAYFIT_BREAK set and
this directory on PYTHONPATH, bounded by --timeout. The verdict:

- caught: the expected test failed (its id and first `E` line are shown);
- caught by pytest-timeout: it failed only at the suite's per-test limit (with a stack dump);
- failed elsewhere: some other test (or a fixture) failed first;
- missed: every selected test passed — the tests cannot see this breakage;
- hung: still running at --timeout (SIGABRT makes faulthandler print every stack, then it is killed).

`--clean` runs the same selections with no breakage: each must pass. `--lock FILE` holds an
flock on FILE around each run (tests that start Ray share the machine's cores).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass(frozen=True)
class Case:
    name: str  # a key of sitecustomize.BREAKAGES
    selection: tuple[str, ...]  # pytest arguments that select the tests
    expected: str  # the test that must fail (a substring of its id)


CASES = [
    Case("replica_500_once", ("tests/test_faults.py", "-k", "load_failures"), "test_load_failures_are_reported"),
    Case("death_is_500", ("tests/test_faults.py", "-k", "killed_replica"), "test_killed_replica_is_restarted"),
    Case("never_reaches", ("tests/test_faults.py", "-k", "killed_replica"), "test_killed_replica_is_restarted"),
    Case("gate_ignored", ("tests/test_faults.py", "-k", "redeploy"), "test_redeploy_with_the_same_plan"),
    Case("stream_raises", ("tests/test_continuous.py", "-k", "batch_and_streams"), "test_batch_and_streams_match"),
    Case("decode_hangs", ("tests/test_continuous.py", "-k", "not_stuck"), "test_a_short_request_is_not_stuck"),
    Case("late_registration", ("tests/test_continuous.py", "-k", "during_the_rebuild"), "during_the_rebuild"),
    Case("gguf_unlocked", ("tests/test_engine.py", "-k", "gguf_conversion"), "test_gguf_conversion_is_cached"),
    Case(
        "relay_uncancelled",
        ("tests/test_cancellation.py", "-k", "relay_cancels and yield"),
        "test_the_ingress_relay_cancels_the_replicas_stream_when_stopped",
    ),
    Case(
        "answer_short",
        ("tests/test_cancellation.py", "-k", "while_queued and replica"),
        "test_streaming_disconnect_while_queued_never_starts",
    ),
    Case(
        "engine_loss_is_500",
        ("tests/test_cancellation.py", "-k", "killed_model_holding and not replica"),
        "test_a_killed_model_holding_process_is_replaced",
    ),
]


@dataclass
class Result:
    case: Case
    verdict: str
    failed: list[str]
    first_error: str
    seconds: float
    log: Path


@contextmanager
def held(lock: str | None):
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_case(case: Case, broken: bool, timeout_s: float, lock: str | None, logs: Path) -> Result:
    env = dict(os.environ)
    env.pop("RAYFIT_BREAK", None)
    if broken:
        env["RAYFIT_BREAK"] = case.name
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    label = case.name if broken else f"clean-{case.name}"
    log = logs / f"{label}.log"
    command = [sys.executable, "-m", "pytest", *case.selection, "-x", "-q", "-rfE", "-p", "no:cacheprovider"]
    with held(lock), open(log, "w") as out:
        start = time.monotonic()
        # A session of its own: on a hang the whole group (pytest and what it started) is killed.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=timeout_s)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            process.send_signal(signal.SIGABRT)  # pytest's faulthandler prints every thread's stack
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            with suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    summary = re.finditer(r"^(FAILED|ERROR) (tests/\S+?(?:\[[^\]]*\])?)(?: - .*)?$", text, re.MULTILINE)
    outcomes = [(m.group(1), m.group(2)) for m in summary]  # ERROR: a fixture failed (e.g. a cluster start)
    failed = [f"{test} ({kind})" if kind == "ERROR" else test for kind, test in outcomes]
    first_error = next((line[1:].strip() for line in text.splitlines() if line.startswith("E ")), "")
    if hung:
        verdict = "hung"
    elif "+++ Timeout +++" in text:
        verdict = "caught by pytest-timeout"
    elif process.returncode == 0:
        verdict = "missed" if broken else "passed"
    elif not broken:
        verdict = "failed"
    elif any(kind == "FAILED" and case.expected in test for kind, test in outcomes):
        verdict = "caught"
    else:
        verdict = "failed elsewhere"
    return Result(case, verdict, failed, first_error[:200], seconds, log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="breakages to run (default: all)")
    parser.add_argument("--clean", action="store_true", help="run the selections with no breakage (each must pass)")
    parser.add_argument("--timeout", type=float, default=720.0, help="seconds before a run counts as hung")
    parser.add_argument("--lock", help="flock this file around each run (e.g. /tmp/rayfit-ray.lock)")
    parser.add_argument("--logs", type=Path, help="where each run's output goes (default: a new temp dir)")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.names or c.name in args.names]
    unknown = set(args.names) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown breakages: {sorted(unknown)}")
    if args.clean:  # one clean run per distinct selection
        cases = list({c.selection: c for c in cases}.values())
    logs = args.logs or Path(tempfile.mkdtemp(prefix="rayfit-breakages-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"logs in {logs}", flush=True)
    results = []
    for case in cases:
        result = run_case(case, not args.clean, args.timeout, args.lock, logs)
        results.append(result)
        what = " ".join(case.selection) if args.clean else case.name
        print(f"{what}: {result.verdict} in {result.seconds:.0f} s; failed {result.failed}", flush=True)
        if result.first_error:
            print(f"    E {result.first_error}", flush=True)
    print("\n| breakage | selection | verdict | failing test | first error | s |\n|---|---|---|---|---|---|")
    for r in results:
        failing = ", ".join(t.split("::")[-1] for t in r.failed) or "-"
        error = r.first_error.replace("|", "\\|") or "-"
        print(
            f"| {r.case.name} | `{' '.join(r.case.selection)}` | {r.verdict} | {failing} | {error} | {r.seconds:.0f} |"
        )
    good = {"passed"} if args.clean else {"caught"}
    return 0 if all(r.verdict in good for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Does the judge catch every bad release, how fast, and what do users see?

Runs zdproxy from outside, as users run it, through a matrix of bad releases (faults x
plans), good releases, a low-traffic rollout and a pinned tenant, each run with its own
fresh app servers, zdproxy and sticky users (judge_run.py), and prints Markdown tables
ready for the README (the numbers are defined in judge_measure.py).

    .venv/bin/python benchmarks/judge_matrix.py                 # the full matrix, ~45 min
    .venv/bin/python benchmarks/judge_matrix.py --quick         # a smoke check, ~4 min
    .venv/bin/python benchmarks/judge_matrix.py --only hang,crash --plans canary --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from faulty_app import SERVICE_TIME, Fault
from judge_measure import RunResult, measure
from judge_run import (
    APPS_PER_COLOR,
    FAULT_AFTER,
    HOLD,
    PIN_TENANT,
    PINNED_USERS,
    PLANS,
    Kind,
    RunSpec,
    execute,
)
from sticky_users import CLIENT_TIMEOUT, POST_SHARE

FAULTS = [f for f in Fault if f is not Fault.NONE]
QUICK_FAULTS = [Fault.ERRORS30, Fault.HANG, Fault.CRASH]
EXTRAS = [str(Kind.GOOD), str(Kind.LOW_TRAFFIC), str(Kind.PINS)]
PLAN_NAMES = ("canary", "bluegreen")
RATE, LOW_RATE, USERS = 250.0, 1.0, 24
ROOT = Path(__file__).resolve().parent.parent


def plan_runs(args: argparse.Namespace) -> list[RunSpec]:
    """Every run of the matrix, in the order they run."""
    only = set(args.only.split(",")) if args.only else {str(f) for f in FAULTS} | set(EXTRAS)
    faults = [f for f in (QUICK_FAULTS if args.quick else FAULTS) if str(f) in only]
    runs = 1 if args.quick else args.runs
    good = min(args.good, 2) if args.quick else args.good
    plans = args.plans.split(",")
    specs: list[RunSpec] = []

    def add(kind: Kind, plan: str, fault: Fault, step: int | None, rate: float) -> None:
        specs.append(RunSpec(kind, plan, fault, step, rate, USERS, args.seed * 10_000 + len(specs)))

    for plan in plans:
        steps = len(PLANS[plan]["steps"])
        for fault in faults:
            for i in range(runs):  # canary: the fault starts in step 1, 2, 3 in turn
                add(Kind.FAULTY, plan, fault, i % steps + 1 if plan == "canary" else None, RATE)
    if str(Kind.GOOD) in only:
        for i in range(good):
            add(Kind.GOOD, plans[i % len(plans)], Fault.NONE, None, RATE)
    if "canary" in plans and str(Kind.LOW_TRAFFIC) in only:
        add(Kind.LOW_TRAFFIC, "lowtraffic", Fault.NONE, None, LOW_RATE)
        add(Kind.LOW_TRAFFIC, "lowtraffic", Fault.ERRORS30, 1, LOW_RATE)
    if "canary" in plans and str(Kind.PINS) in only:
        add(Kind.PINS, "canary", Fault.ERRORS30, 1, RATE)
    return specs


async def run_all(specs: list[RunSpec], results: list[RunResult], broken: list[str]) -> None:
    """Every run in turn, its result appended to `results` as it comes. A run that breaks
    (zdproxy did not start, a deploy was refused, the admin API failed) goes to `broken`
    with the tail of zdproxy's log printed, and the matrix goes on."""
    began = time.monotonic()
    for n, spec in enumerate(specs, start=1):
        with tempfile.TemporaryDirectory(prefix="zdjudge-") as tmp:
            try:
                result = measure(await execute(spec, Path(tmp)))
            except Exception as exc:
                path = Path(tmp) / "zdproxy.log"
                log = path.read_text(errors="replace")[-1500:] if path.exists() else ""
                print(f"[{n}/{len(specs)}] {spec.cell}: run broke: {exc!r}\n{log}", flush=True)
                broken.append(f"{spec.cell} (seed {spec.seed}): {exc!r}"[:300])
                continue
        results.append(result)
        elapsed = time.monotonic() - began
        print(f"[{n}/{len(specs)} {elapsed:5.0f}s] {result.progress()}", flush=True)


# -- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The zdproxy measured: its commit, and a digest of its files when the matrix began."""

    revision: str
    digest: str

    def changed(self) -> str:
        if source_digest() == self.digest:
            return ""
        return " (its files changed while the matrix ran: each run used them as they were)"


def seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} s ({max(values):.2f} s)"


def errors(results: list[RunResult], method: str) -> str:
    failed = sum(getattr(r, f"{method}_errors") for r in results)
    total = sum(getattr(r, f"{method}_requests") for r in results)
    return f"{failed:,} of {total:,}"


def caught(results: list[RunResult]) -> str:
    text = f"{sum(r.caught for r in results)}/{len(results)}"
    missed: dict[str, int] = {}
    for r in results:
        if not r.caught:
            missed[r.outcome] = missed.get(r.outcome, 0) + 1
    return text + (f" ({', '.join(f'{n} {o}' for o, n in missed.items())})" if missed else "")


def plan_table(plan: str, results: list[RunResult]) -> list[str]:
    runs = [r for r in results if r.kind == Kind.FAULTY and r.plan == plan]
    if not runs:
        return []
    lines = [f"### {plan}: {describe(plan)}", ""]
    lines.append(
        "| fault | caught | fault at | median reaction (max) | rollback event, median (max) "
        "| GET errors | POST errors |"
    )
    lines.append("|---|---|---|--:|--:|--:|--:|")
    for fault in FAULTS:
        cell = [r for r in runs if r.fault == fault and not r.no_user_on_share]
        if not cell:
            continue
        where = ", ".join(sorted({r.fault_at or "-" for r in cell}))
        reactions = [r.reaction for r in cell if r.reaction is not None]
        rollbacks = [r.rollback_after for r in cell if r.rollback_after is not None]
        lines.append(
            f"| {fault} | {caught(cell)} | {where} | {seconds(reactions)} | {seconds(rollbacks)} "
            f"| {errors(cell, 'get')} | {errors(cell, 'post')} |"
        )
    apart = [r for r in runs if r.no_user_on_share]
    if apart:
        heading = (
            "Runs with no user on the canary's share when the fault started, or held at an "
            "earlier step with no user on it (left out of the table):"
        )
        lines += ["", heading, ""]
        lines += [f"- {r.progress()}" for r in apart]
    return lines


def describe(plan: str) -> str:
    steps = ", ".join(f"{s['weight']}%" for s in PLANS[plan]["steps"])
    settings = PLANS[plan]
    extra = f", step_deadline {settings['step_deadline']}" if "step_deadline" in settings else ""
    return f"steps {steps}, hold {HOLD:g}s each, bake {settings['bake']}{extra}"


def good_line(results: list[RunResult]) -> str:
    runs = [r for r in results if r.kind == Kind.GOOD]
    if not runs:
        return ""
    by_plan = ", ".join(f"{sum(r.plan == p for r in runs)} {p}" for p in PLAN_NAMES)
    done = sum(r.outcome == "done" for r in runs)
    alarms = [r for r in runs if r.outcome in ("rolled_back", "aborted", "paused", "frozen")]
    held = [r for r in runs if r.outcome.startswith("still")]
    empty = sum(r.no_user_on_share for r in held)
    text = (
        f"**Good releases**: {len(runs)} runs ({by_plan}): {done} done, "
        f"{len(alarms)} false alarms, {len(held)} held without a verdict ({empty} of them "
        "with no user on the candidate's share); user errors "
        f"GET {errors(runs, 'get')}, POST {errors(runs, 'post')}."
    )
    for r in alarms + held:
        text += f" {r.plan} (seed {r.seed}): {r.outcome} {r.reason[:100]}."
    return text


def low_traffic_line(results: list[RunResult]) -> str:
    runs = [r for r in results if r.kind == Kind.LOW_TRAFFIC]
    if not runs:
        return ""
    parts = []
    for r in runs:
        what = "good candidate" if r.fault == Fault.NONE else f"bad candidate ({r.fault})"
        passed = r.max_step > 1 or r.outcome == "done"
        verdict = "PASSED A STEP ON NO EVIDENCE" if passed else "never passed step 1"
        when = f" {r.ended_after:.1f} s after the deploy" if r.ended_after is not None else ""
        reason = f" ({r.reason})" if r.reason else ""
        parts.append(
            f"{what}: {r.outcome}{when}{reason}, {verdict}; requests that reached the "
            f"candidate: {r.candidate_requests}"
        )
    return (
        f"**Low traffic** ({LOW_RATE:g} req/s in all, plan {describe('lowtraffic')}): "
        + "; ".join(parts) + "."
    )  # fmt: skip


def pins_line(results: list[RunResult]) -> str:
    runs = [r for r in results if r.kind == Kind.PINS]
    if not runs:
        return ""
    r = runs[0]
    head = (
        f"**Pins** (a tenant of {PINNED_USERS} users pinned to green by `X-Tenant: "
        f"{PIN_TENANT}`, canary with {r.fault} from {r.fault_at or '-'}): {r.outcome}"
    )
    if not r.caught or r.pinned_back_after is None:
        return head + "; the tenant's return to blue was not measured (no rollback)."
    if r.pinned_on_green_at_end:
        back = f"still reached green {r.pinned_back_after:.1f} s after it (end of the watch)"
    elif r.pinned_back_after:
        back = f"last reached green {r.pinned_back_after:.2f} s after it"
    else:
        back = "never reached green after it"
    return (
        f"{head}; green served {r.pinned_on_green_before} of the tenant's requests before the "
        f"rollback, the tenant {back}; its errors: {r.pinned_errors_before_rollback} before "
        f"the rollback, {r.pinned_errors_after_rollback} after."
    )


def revision() -> str:
    """The commit measured, as `git rev-parse --short HEAD` (+ uncommitted changes)."""

    def git(*argv: str) -> str:
        found = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return found.stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--short") else ""
    return f"{git('rev-parse', '--short', 'HEAD')}{dirty}"


def source_digest() -> str:
    """Of zdproxy's source files: each run starts zdproxy from what is on disk then."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "zdproxy").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def conditions(results: list[RunResult], source: Source) -> list[str]:
    rates = [r.rate for r in results if r.kind != Kind.LOW_TRAFFIC]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    low, high = SERVICE_TIME
    return [
        f"zdproxy {source.revision}{source.changed()}; {os.cpu_count()} cores ({cpu}), Python "
        f"{platform.python_version()}; `{' '.join(['judge_matrix.py', *sys.argv[1:]])}`.",
        f"Traffic: {USERS} sticky users (one cookie jar each), {RATE:g} req/s in all "
        f"(achieved: median {statistics.median(rates) if rates else 0:.0f} req/s per run), "
        f"{100 - POST_SHARE * 100:.0f}% GET, {POST_SHARE * 100:.0f}% POST (64-512 B, no "
        f"Idempotency-Key), client timeout {CLIENT_TIMEOUT:g} s. Apps: {APPS_PER_COLOR} per "
        f"color, service time uniform {low * 1000:.0f}-{high * 1000:.0f} ms.",
        f"Plans: canary {describe('canary')}; bluegreen {describe('bluegreen')}. Judge, "
        "tick, health checks, retries, outlier ejection, timeouts: zdproxy's defaults.",
        f"A fault starts {FAULT_AFTER[0]:g}-{FAULT_AFTER[1]:g} s into its step (canary: step "
        "1, 2, 3 in turn) or into the bake (bluegreen), on every green app at once. "
        "Reaction: from the first bad answer (hang: the first request that hung; crash, "
        "refused: the fault) to the last new request that reached green (apps' records; "
        "crash, refused: zdproxy's per-upstream counters, up to 0.2 s late). Rollback event: "
        "from the same start to zdproxy's rollout_rolled_back event. Errors: "
        "non-2xx, transport errors and client timeouts, summed over the cell's runs.",
    ]


def report(
    results: list[RunResult], broken: list[str], source: Source, args: argparse.Namespace
) -> str:
    """Markdown: the conditions, one table per plan, then the good, low-traffic, pins lines."""
    blocks = ["## Judge matrix", "\n".join(f"- {c}" for c in conditions(results, source))]
    blocks += ["\n".join(t) for plan in args.plans.split(",") if (t := plan_table(plan, results))]
    lines = [line for line in (good_line(results), low_traffic_line(results), pins_line(results))]
    lines += [f"**Broken run** (left out above): {b}" for b in broken]
    if any(lines):
        blocks.append("\n".join(f"- {line}" for line in lines if line))
    return "\n\n".join(blocks) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per fault and plan (3)")
    parser.add_argument("--good", type=int, default=20, help="good releases, plans in turn (20)")
    parser.add_argument(
        "--only", help=f"comma list of {', '.join(map(str, FAULTS))}, {', '.join(EXTRAS)}"
    )
    parser.add_argument("--plans", default="canary,bluegreen", help="comma list (canary,bluegreen)")
    parser.add_argument("--quick", action="store_true", help="1 run per cell of errors30, hang, "
                        "crash; 2 good releases; the low-traffic and pins runs")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--seed", type=int, default=1, help="seed of the users, apps, fault times")
    args = parser.parse_args()
    for plan in args.plans.split(","):
        if plan not in PLAN_NAMES:
            parser.error(f"--plans: no plan {plan!r}")
    for name in args.only.split(",") if args.only else []:
        if name not in {*map(str, FAULTS), *EXTRAS}:
            parser.error(f"--only: no fault or run kind {name!r}")
    specs = plan_runs(args)
    source = Source(revision(), source_digest())
    print(f"{len(specs)} runs against zdproxy {source.revision}", flush=True)
    results: list[RunResult] = []
    broken: list[str] = []
    loop = asyncio.new_event_loop()
    task = loop.create_task(run_all(specs, results, broken))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # children stop in finally blocks
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        print(f"stopped (SIGTERM) after {len(results)} of {len(specs)} runs", flush=True)
    text = report(results, broken, source, args)
    print("\n" + text, flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"report": text, "runs": [asdict(r) for r in results]}, indent=1)
        )


if __name__ == "__main__":
    main()

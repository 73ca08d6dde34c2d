"""Crash safety of api_request_parallel_processor.py: kill -9 and resume, Ctrl-C, a second Ctrl-C.

    python benchmarks/crash_safety.py                  # all three parts, about 2.5 minutes on 2 cores
    python benchmarks/crash_safety.py --only kill9     # one part: kill9 | sigint | double_sigint
    python benchmarks/crash_safety.py --seed 7         # other kill moments

The processor runs as a subprocess, as a user runs it, against the fake Anthropic server of
tests/fake_server.py (started here, in a thread). Nothing leaves 127.0.0.1 and no API key is needed.
Prints a markdown summary; the exit status is 1 when a check failed. Figures also go to
benchmarks/out/crash_safety.json, the processor's logs to benchmarks/out/logs/crash_safety/.

1. kill -9. A job of 2,000 distinct requests (metadata {"row": i}); the server answers in 0.2-1.5 s and
   fails 20% of attempts at random (529, 500, an HTML 503, dropped connections, hangs, truncated JSON; hangs
   are cut by --request_timeout 2). Server and processor share a limit of 1,200 requests a minute (token
   limits out of the way), so the job takes about a minute uninterrupted: the one-minute bucket sends the
   first 1,200 attempts at once, the other ~1,300 (faults included) take another minute (74 s in a measured
   run). At 10 seeded random moments (1-8 s after each start) the processor is SIGKILLed and the
   same command is started again; after the 10th restart it finishes. Checked:
   - the final save file holds exactly one line per input line, all successes, each row once, every line
     complete JSON with the request as it was in the input (no torn or garbage line);
   - no request whose success line was in the file at a kill was *received* by the server again after
     that kill (the server's request handler is wrapped here to count every attempt per body);
   - duplicate paid answers (bodies the server answered successfully more than once, from its
     request_bodies_by_fingerprint) are bounded by the requests in flight at the kills. The processor
     logs nothing at a kill, so "in flight" is measured from outside, right after each kill, once the
     server has dropped the dead client's connections: answers the server completed whose result line is
     not in the file (server `successes` minus the file's success lines, per kill). Each duplicate must
     also belong to such a request (per-body check). For scale the table also gives the number of
     requests the server was working on just before each kill.
2. Ctrl-C. A 1,000-request job (concurrency capped at 80 so it lasts ~15 s, same faults, --request_timeout
   2) gets SIGINT after 5 s: exit status 130, seconds from SIGINT to exit (limit: the default 30 s grace),
   every line written so far complete, then the same command resumes and leaves one line per input. Then
   the same with --shutdown_grace 2 and a slow server (3-10 s per answer, no faults), so that requests are
   still in flight at the deadline: the exit must come about 2 s after the SIGINT (2 s + 1 s allowance
   for process teardown), and the requests cut off must be resent by the resume, not lost. "dup. paid"
   counts answers the server finished but the stopped run never wrote (paid again by the resume), with
   how long before the exit the server finished them.
3. A second Ctrl-C 0.5 s after the first (slow server, requests in flight): exit status 130 at once, the
   file holds only complete lines, and the same command resumes and finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROCESSOR = ROOT / "api_request_parallel_processor.py"
OUT = HERE / "out"
LOGS = OUT / "logs" / "crash_safety"
MODEL = "claude-sonnet-4-5"
API_KEY = "sk-ant-crash-safety-not-a-real-key"
HIGH = 100_000_000  # a token limit that never binds
FAULTS = ("529", "500", "503_html", "drop", "hang", "bad_json")

sys.path.insert(0, str(ROOT / "tests"))
import fake_server as fs  # noqa: E402  (imported, never modified)


# ======================================================================================================
# Workload, server, save file
# ======================================================================================================


def make_rows(n: int, tag: str) -> list[dict]:
    """n distinct request bodies, each with the tool's metadata {"row": i}."""
    return [{"model": MODEL, "max_tokens": 64,
             "messages": [{"role": "user", "content": f"[{tag}] row {i}: what is {i} * 7? Answer briefly."}],
             "metadata": {"row": i}} for i in range(n)]


def sent_body(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "metadata"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


class Server:
    """The fake server in a thread, with every attempt counted per body fingerprint (successful or not).

    The fake server itself counts only successful answers per body; to see whether a request was *sent*
    again, its message handler is wrapped (at run time; the file is not changed).
    """

    def __init__(self, config: fs.ServerConfig):
        self.thread = fs.ServerThread(config)
        self._lock = threading.Lock()
        self._received: Counter = Counter()
        self._attempts: dict[str, list] = {}  # fingerprint -> [(start s, end s, status or what happened)]
        self.started = time.monotonic()
        inner = self.thread.server
        original = inner._serve_message

        async def counting(request):
            raw = await request.read()  # aiohttp keeps the body; the real handler reads it again
            try:
                body = json.loads(raw)
                fingerprint = fs.body_fingerprint({k: v for k, v in body.items() if k != "stream"})
            except Exception:  # noqa: BLE001  (not ours to judge: the real handler answers it)
                fingerprint = None
            if fingerprint:
                with self._lock:
                    self._received[fingerprint] += 1
            began, outcome = self.clock(), "error"
            try:
                response = await original(request)
                outcome = "dropped" if response is None else response.status
                return response
            except asyncio.CancelledError:
                outcome = "cancelled"  # the client went away (a kill, a timeout, a stop)
                raise
            finally:
                if fingerprint:
                    with self._lock:
                        self._attempts.setdefault(fingerprint, []).append((began, self.clock(), outcome))

        inner._serve_message = counting

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.thread.stop()

    @property
    def url(self) -> str:
        return self.thread.messages_url

    def clock(self) -> float:
        """Seconds since this server was built, rounded to the millisecond."""
        return round(time.monotonic() - self.started, 3)

    def attempts_of(self, fingerprint: str) -> list:
        with self._lock:
            return list(self._attempts.get(fingerprint, []))

    def stats(self) -> dict[str, Any]:
        return self.thread.stats_snapshot()

    def received(self) -> Counter:
        with self._lock:
            return Counter(self._received)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the server runs no handler (a dead client's connections are noticed and cancelled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()["in_flight"] == 0:
                time.sleep(0.05)  # a handler that just finished may still be writing its counters
                if self.stats()["in_flight"] == 0:
                    return True
            time.sleep(0.05)
        return False


@dataclass
class SaveState:
    """What a save file holds, read as the next run would."""

    complete_lines: int = 0
    torn_bytes: int = 0  # a last line without its newline
    garbage: int = 0  # complete lines that are not JSON or not a [request, result, metadata] record
    wrong_request: int = 0  # lines whose request is not the input body of their row
    success_rows: Counter = field(default_factory=Counter)
    failure_rows: Counter = field(default_factory=Counter)

    @property
    def successes(self) -> int:
        return sum(self.success_rows.values())

    @property
    def failures(self) -> int:
        return sum(self.failure_rows.values())


def read_save(path: Path, bodies: list[dict] | None = None) -> SaveState:
    state = SaveState()
    if not path.exists():
        return state
    data = path.read_bytes()
    lines = data.split(b"\n")
    state.torn_bytes = len(lines[-1])  # b"" when the file ends with a newline
    for raw in lines[:-1]:
        state.complete_lines += 1
        try:
            record = json.loads(raw)
            request, result, metadata = record
            row = metadata["row"]
        except (ValueError, TypeError, KeyError):
            state.garbage += 1
            continue
        if bodies is not None and not (isinstance(row, int) and 0 <= row < len(bodies) and request == bodies[row]):
            state.wrong_request += 1
        if isinstance(result, dict) and result.get("type") == "message":
            state.success_rows[row] += 1
        elif isinstance(result, list):
            state.failure_rows[row] += 1
        else:
            state.garbage += 1
    return state


def count_complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


LOGGING_LEVEL = "INFO"  # --logging_level of every child (this script's --logging_level sets it)


def processor_cmd(requests: Path, save: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, str(PROCESSOR), "--requests_filepath", str(requests), "--save_filepath", str(save),
            "--request_url", url, "--no_progress", "--logging_level", LOGGING_LEVEL, *extra]


def child_env(backoff_scale: float | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("APPP_BACKOFF_SCALE", "ANTHROPIC_API_KEY")}
    env["ANTHROPIC_API_KEY"] = API_KEY
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if backoff_scale is not None:
        env["APPP_BACKOFF_SCALE"] = str(backoff_scale)
    return env


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        handle.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(cmd[1:])}\n".encode())
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def duplicates(stats: dict[str, Any]) -> tuple[int, int]:
    """(extra paid answers, bodies answered more than once) from the server's per-body success counts."""
    counts = stats["request_bodies_by_fingerprint"].values()
    return sum(c - 1 for c in counts if c > 1), sum(1 for c in counts if c > 1)


# ======================================================================================================
# 1. kill -9
# ======================================================================================================


def run_kill9(workdir: Path, *, n: int = 2000, kills: int = 10, rpm: float = 1200, seed: int = 1,
              kill_after: tuple[float, float] = (1.0, 8.0), latency: tuple[float, float] = (0.2, 1.5),
              fault_rate: float = 0.2, request_timeout: float = 2.0, max_attempts: int = 10,
              backoff_scale: float | None = None, final_timeout: float = 240.0, log: Path | None = None,
              extra_args: tuple[str, ...] = ()) -> dict:
    """SIGKILL the processor `kills` times at seeded random moments, restart it each time, let the last
    run finish; return every figure and a list of failed checks (empty when all hold)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n, f"kill9-{seed}")
    bodies = [sent_body(row) for row in rows]
    fingerprints = [fs.body_fingerprint(body) for body in bodies]
    row_of = {fp: i for i, fp in enumerate(fingerprints)}
    requests, save = workdir / "requests.jsonl", workdir / "results.jsonl"
    write_jsonl(requests, rows)
    log = log or LOGS / "kill9.log"
    log.unlink(missing_ok=True)
    config = fs.ServerConfig(latency_seconds=latency, fault_rate=fault_rate, fault_kinds=FAULTS, seed=seed,
                             limits={"default": fs.ModelLimits(requests_per_minute=rpm)})
    rng = random.Random(seed)
    env = child_env(backoff_scale)
    kill_records: list[dict] = []
    problems: list[str] = []
    started = time.monotonic()
    with Server(config) as server:
        cmd = processor_cmd(requests, save, server.url, "--max_requests_per_minute", f"{rpm:g}",
                            "--max_tokens_per_minute", str(HIGH), "--max_output_tokens_per_minute", str(HIGH),
                            "--request_timeout", f"{request_timeout:g}", "--max_attempts", str(max_attempts),
                            *extra_args)
        finished_early = None
        previous_unwritten = previous_received = 0
        for k in range(kills):
            proc = start(cmd, log, env, workdir)
            delay = rng.uniform(*kill_after)
            try:
                code = proc.wait(timeout=delay)
                finished_early = {"run": k + 1, "exit": code}  # the job ended before this kill
                break
            except subprocess.TimeoutExpired:
                pass
            lines_before = count_complete_lines(save)
            server_busy_before = server.stats()["in_flight"]
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = server.clock()
            proc.wait()
            idle = server.wait_idle()
            stats, received, state = server.stats(), server.received(), read_save(save, bodies)
            unwritten_total = stats["successes"] - state.successes  # answered but never written, all kills so far
            by_body = stats["request_bodies_by_fingerprint"]
            answered_unwritten_rows = {row_of.get(fp, -1) for fp, count in by_body.items()
                                       if count > state.success_rows.get(row_of.get(fp, -1), 0)}
            kill_records.append({
                "kill": k + 1, "after_s": round(delay, 2), "at_s": killed_at, "lines_before_kill": lines_before,
                "attempts_in_run": stats["requests_received"] - previous_received,
                "lines_after_kill": state.complete_lines, "torn_bytes": state.torn_bytes, "garbage": state.garbage,
                "server_in_flight_before_kill": server_busy_before, "server_idle_after_kill": idle,
                "answered_unwritten": unwritten_total - previous_unwritten,
                "_answered_unwritten_rows": answered_unwritten_rows,
                "_written_rows": set(state.success_rows), "_received": received})
            previous_unwritten, previous_received = unwritten_total, stats["requests_received"]
            if not idle:
                problems.append(f"kill {k + 1}: the server still ran handlers 5 s after the kill")
        final_exit = None
        if finished_early is None:
            proc = start(cmd, log, env, workdir)
            try:
                final_exit = proc.wait(timeout=final_timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                problems.append(f"the last run did not finish within {final_timeout:g} s")
        else:
            final_exit = finished_early["exit"]
            problems.append(f"the job finished on its own in run {finished_early['run']}, before kill "
                            f"{finished_early['run']} (only {len(kill_records)} kills)")
        server.wait_idle()
        stats, received = server.stats(), server.received()
        server_attempts = {fp: server.attempts_of(fp) for fp in fingerprints}
    wall = time.monotonic() - started

    final = read_save(save, bodies)
    extra_answers, bodies_twice = duplicates(stats)
    bound = sum(r["answered_unwritten"] for r in kill_records)
    # Per body: each duplicate must be a request that was answered but not written at some kill.
    explained = set().union(*(r["_answered_unwritten_rows"] for r in kill_records)) if kill_records else set()
    unexplained = [row_of.get(fp, -1) for fp, c in stats["request_bodies_by_fingerprint"].items()
                   if c > 1 and row_of.get(fp, -1) not in explained]
    # Written, then sent again: a row with a success line at kill k that the server received after kill k.
    resent_after_written = set()
    for record in kill_records:
        for row in record["_written_rows"]:
            if received[fingerprints[row]] > record["_received"][fingerprints[row]]:
                resent_after_written.add(row)
    unknown_bodies = sum(1 for fp in stats["request_bodies_by_fingerprint"] if fp not in row_of)
    # For a duplicate no kill explains: every attempt of that body as the server saw it.
    unexplained_detail = {row: server_attempts.get(fingerprints[row], []) for row in unexplained[:5]}

    if final_exit != 0:
        problems.append(f"the last run exited with status {final_exit}, not 0")
    if final.complete_lines != n or final.torn_bytes or final.garbage or final.wrong_request:
        problems.append(f"final file: {final.complete_lines} complete lines for {n} inputs, torn {final.torn_bytes} "
                        f"bytes, {final.garbage} garbage, {final.wrong_request} with a wrong request")
    if final.failures or set(final.success_rows) != set(range(n)) or any(c != 1 for c in final.success_rows.values()):
        problems.append(f"final file: {final.failures} failure lines, {len(final.success_rows)} distinct rows "
                        f"answered, {sum(1 for c in final.success_rows.values() if c > 1)} rows twice")
    if resent_after_written:
        problems.append(f"{len(resent_after_written)} request(s) were sent again after their result was written, "
                        f"e.g. rows {sorted(resent_after_written)[:5]}")
    if extra_answers > bound:
        problems.append(f"{extra_answers} duplicate paid answers exceed the bound of {bound}")
    if unexplained:
        problems.append(f"{len(unexplained)} duplicated bodies were not answered-but-unwritten at any kill; kills at "
                        f"{[r['at_s'] for r in kill_records]} s; attempts (start s, end s, status) of the first: "
                        f"{unexplained_detail}")
    if unknown_bodies:
        problems.append(f"the server answered {unknown_bodies} body(ies) that are not in the input")
    for record in kill_records:
        if record["garbage"]:
            problems.append(f"kill {record['kill']}: {record['garbage']} garbage line(s) in the file")
    return {
        "requests": n, "rpm": rpm, "seed": seed, "kills": len(kill_records), "runs_started": len(kill_records) + 1,
        "http_attempts": stats["requests_received"], "server_successes": stats["successes"],
        "rate_limited": stats["rate_limited"], "faults_injected": sum(stats["faults_injected"].values()),
        "final_exit": final_exit, "final_lines": final.complete_lines, "final_successes": final.successes,
        "final_distinct_rows": len(final.success_rows), "final_torn_bytes": final.torn_bytes,
        "final_garbage": final.garbage + final.wrong_request,
        "duplicate_paid_answers": extra_answers, "bodies_answered_twice_or_more": bodies_twice,
        "bound_answered_unwritten_at_kills": bound,
        "server_in_flight_before_kills": sum(r["server_in_flight_before_kill"] for r in kill_records),
        "unexplained_duplicates": len(unexplained), "unexplained_detail": unexplained_detail,
        "resent_after_written": len(resent_after_written),
        "torn_lines_seen_after_kills": sum(1 for r in kill_records if r["torn_bytes"]),
        "wall_s": round(wall, 1),
        "per_kill": [{k: v for k, v in r.items() if not k.startswith("_")} for r in kill_records],
        "problems": problems,
    }


# ======================================================================================================
# 2 and 3. Ctrl-C, once or twice
# ======================================================================================================

WAITING_PATTERN = re.compile(r"waiting up to ([\d.]+) s for (\d+) request\(s\) in flight")


def run_interrupt(workdir: Path, name: str, *, n: int = 1000, config: fs.ServerConfig, extra: list[str],
                  sigint_after: float = 5.0, second_sigint_after: float | None = None,
                  grace: float = 30.0, resume_timeout: float = 120.0) -> dict:
    """Start a job, SIGINT it after `sigint_after` s (and again `second_sigint_after` s later), check the
    exit and the file, then run the same command to the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n, name)
    bodies = [sent_body(row) for row in rows]
    requests, save = workdir / "requests.jsonl", workdir / "results.jsonl"
    write_jsonl(requests, rows)
    log = LOGS / f"{name}.log"
    log.unlink(missing_ok=True)
    env = child_env()
    problems: list[str] = []
    result: dict[str, Any] = {"requests": n}
    with Server(config) as server:
        cmd = processor_cmd(requests, save, server.url, *extra)
        proc = start(cmd, log, env, workdir)
        try:
            code = proc.wait(timeout=sigint_after)
            problems.append(f"the job ended (status {code}) before the SIGINT")
            return {**result, "problems": problems}
        except subprocess.TimeoutExpired:
            pass
        lines_at_sigint = count_complete_lines(save)
        server_in_flight = server.stats()["in_flight"]
        sigint_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        last_signal_at = sigint_at
        if second_sigint_after is not None:
            time.sleep(second_sigint_after)
            if proc.poll() is None:
                last_signal_at = time.monotonic()
                proc.send_signal(signal.SIGINT)
            else:
                problems.append("the process had already exited before the second SIGINT")
        try:
            code = proc.wait(timeout=grace + 30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            code = proc.wait()
            problems.append(f"no exit {grace + 30:g} s after the SIGINT: killed")
        exited_at, exit_clock = time.monotonic(), server.clock()
        server.wait_idle()
        stopped = read_save(save, bodies)
        text = log.read_text(errors="replace")
        waiting = WAITING_PATTERN.search(text)
        in_flight_at_sigint = int(waiting.group(2)) if waiting else None
        written_in_grace = stopped.complete_lines - lines_at_sigint
        result.update({
            "exit": code, "sigint_to_exit_s": round(exited_at - sigint_at, 2),
            "last_signal_to_exit_s": round(exited_at - last_signal_at, 2), "grace_s": grace,
            "lines_at_sigint": lines_at_sigint, "lines_at_exit": stopped.complete_lines,
            "in_flight_at_sigint_logged": in_flight_at_sigint, "server_in_flight_at_sigint": server_in_flight,
            "written_during_grace": written_in_grace,
            "left_unwritten": None if in_flight_at_sigint is None else in_flight_at_sigint - written_in_grace,
            "torn_bytes_at_exit": stopped.torn_bytes, "garbage_at_exit": stopped.garbage + stopped.wrong_request,
            "rows_twice_at_exit": sum(1 for c in stopped.success_rows.values() if c > 1),
            "resume_hint_logged": "To resume, run the same command again" in text,
        })
        if code != 130:
            problems.append(f"exit status {code}, not 130")
        if stopped.torn_bytes or stopped.garbage or stopped.wrong_request:
            problems.append(f"after the stop: torn {stopped.torn_bytes} bytes, {stopped.garbage} garbage, "
                            f"{stopped.wrong_request} wrong request lines")
        if result["rows_twice_at_exit"]:
            problems.append(f"after the stop: {result['rows_twice_at_exit']} rows have two success lines")
        if stopped.complete_lines >= n:
            problems.append("the stop came too late: every line was already written")
        resume_started = time.monotonic()
        proc = start(cmd, log, env, workdir)
        try:
            resumed = proc.wait(timeout=resume_timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            resumed = proc.wait()
            problems.append(f"the resume did not finish within {resume_timeout:g} s")
        result["resume_s"] = round(time.monotonic() - resume_started, 1)
        server.wait_idle()
        stats = server.stats()
        # When the server finished the answers that were paid twice, before the stopped run's exit.
        twice = [fp for fp, count in stats["request_bodies_by_fingerprint"].items() if count > 1]
        finished_before_exit = [exit_clock - min(end for _, end, status in server.attempts_of(fp) if status == 200)
                                for fp in twice]
    final = read_save(save, bodies)
    extra_answers, _ = duplicates(stats)
    result.update({"resume_exit": resumed, "final_lines": final.complete_lines,
                   "final_rows_once": set(final.success_rows) == set(range(n))
                   and all(c == 1 for c in final.success_rows.values()) and not final.failures,
                   "duplicate_paid_answers": extra_answers})
    # Each was answered by the server this long before the stopped run exited, and never written.
    result["duplicates_answered_s_before_exit"] = [round(min(finished_before_exit), 3),
                                                   round(max(finished_before_exit), 3)] if twice else None
    if resumed != 0:
        problems.append(f"the resume exited with status {resumed}, not 0")
    if final.complete_lines != n or final.torn_bytes or final.garbage or final.wrong_request or not result["final_rows_once"]:
        problems.append(f"after the resume: {final.complete_lines} lines for {n} inputs, "
                        f"{len(final.success_rows)} distinct rows, {final.failures} failures, torn {final.torn_bytes}")
    result["problems"] = problems
    return result


def run_sigint(workdir: Path) -> dict:
    faulty = fs.ServerConfig(latency_seconds=(0.2, 1.5), fault_rate=0.2, fault_kinds=FAULTS, seed=2)
    common = ["--max_requests_per_minute", "100000", "--max_tokens_per_minute", str(HIGH),
              "--max_output_tokens_per_minute", str(HIGH), "--max_attempts", "10"]
    default = run_interrupt(workdir / "default_grace", "sigint_default_grace", config=faulty,
                            extra=[*common, "--max_concurrent_requests", "80", "--request_timeout", "2"], grace=30.0)
    if default.get("sigint_to_exit_s", 0) > 30.0:
        default["problems"].append(f"exit {default['sigint_to_exit_s']} s after the SIGINT: beyond the 30 s grace")
    slow = fs.ServerConfig(latency_seconds=(3.0, 10.0), seed=3)
    short = run_interrupt(workdir / "grace_2", "sigint_grace_2", config=slow,
                          extra=[*common, "--shutdown_grace", "2"], grace=2.0)
    if short.get("sigint_to_exit_s", 0) > 3.0:
        short["problems"].append(f"exit {short['sigint_to_exit_s']} s after the SIGINT: beyond the 2 s grace + 1 s")
    if not short.get("left_unwritten"):
        short["problems"].append("no request was still in flight at the 2 s deadline: the case was not exercised")
    return {"default_grace": default, "grace_2": short}


def run_double_sigint(workdir: Path) -> dict:
    slow = fs.ServerConfig(latency_seconds=(3.0, 10.0), seed=4)
    extra = ["--max_requests_per_minute", "100000", "--max_tokens_per_minute", str(HIGH),
             "--max_output_tokens_per_minute", str(HIGH)]
    result = run_interrupt(workdir / "double", "double_sigint", config=slow, extra=extra, second_sigint_after=0.5)
    if result.get("last_signal_to_exit_s", 0) > 1.0:
        result["problems"].append(f"exit {result['last_signal_to_exit_s']} s after the second SIGINT: not at once")
    return result


# ======================================================================================================
# Report
# ======================================================================================================


def fmt_before_exit(r: dict) -> str:
    span = r.get("duplicates_answered_s_before_exit")
    return f" (answered {span[0]:g}-{span[1]:g} s before the exit)" if span else ""


def fmt_checks(problems: list[str]) -> str:
    return "all checks pass" if not problems else "**FAILED**: " + "; ".join(problems)


def report(results: dict) -> str:
    out: list[str] = []
    if "kill9" in results:
        r = results["kill9"]
        out += ["## 1. kill -9 and resume", "",
                f"{r['requests']:,} distinct requests, {r['rpm']:g} RPM (server and processor), 20% random faults "
                f"incl. hangs (--request_timeout 2), latency 0.2-1.5 s, seed {r['seed']}; wall {r['wall_s']} s.", "",
                "| figure | value |", "|---|---:|",
                f"| SIGKILLs (then the same command again) | {r['kills']} |",
                f"| runs started | {r['runs_started']} |",
                f"| HTTP attempts received by the server | {r['http_attempts']:,} |",
                f"| faults injected / 429s | {r['faults_injected']:,} / {r['rate_limited']:,} |",
                f"| final exit status | {r['final_exit']} |",
                f"| final file: lines / successes / distinct rows (expected {r['requests']:,}) | "
                f"{r['final_lines']:,} / {r['final_successes']:,} / {r['final_distinct_rows']:,} |",
                f"| final file: torn or garbage lines | {int(bool(r['final_torn_bytes'])) + r['final_garbage']} |",
                f"| torn last line seen right after a kill (repaired by the next run) | {r['torn_lines_seen_after_kills']} "
                f"of {r['kills']} |",
                f"| requests re-sent after their result was written | {r['resent_after_written']} |",
                f"| **duplicate paid answers** (extra successes; bodies) | {r['duplicate_paid_answers']} "
                f"({r['bodies_answered_twice_or_more']} bodies) |",
                f"| **bound**: answered by the server but unwritten at the kills | {r['bound_answered_unwritten_at_kills']} |",
                f"| duplicates not explained by a kill (per body) | {r['unexplained_duplicates']} |",
                f"| for scale: requests the server was working on just before the kills | "
                f"{r['server_in_flight_before_kills']:,} |", "",
                "| kill | after s | attempts in run | lines before / after kill | server busy before "
                "| answered, unwritten | torn bytes |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {k['kill']} | {k['after_s']} | {k['attempts_in_run']:,} | "
                f"{k['lines_before_kill']:,} / {k['lines_after_kill']:,} | "
                f"{k['server_in_flight_before_kill']} | {k['answered_unwritten']} | {k['torn_bytes']} |"
                for k in r["per_kill"]]
        out += ["", fmt_checks(r["problems"]), ""]
    if "sigint" in results:
        out += ["## 2. Ctrl-C (SIGINT) and resume", "",
                "| case | exit | SIGINT to exit s | grace s | in flight at SIGINT | written in grace | left unwritten "
                "| lines at exit | torn/garbage | resume exit, s | final lines | dup. paid |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in results["sigint"].items():
            if "exit" not in r:
                out.append(f"| {label} | - | | | | | | | | | | |")
                continue
            out.append(f"| {label} | {r['exit']} | {r['sigint_to_exit_s']} | {r['grace_s']:g} | "
                       f"{r['in_flight_at_sigint_logged']} | {r['written_during_grace']} | {r['left_unwritten']} | "
                       f"{r['lines_at_exit']:,} | {int(bool(r['torn_bytes_at_exit'])) + r['garbage_at_exit']} | "
                       f"{r['resume_exit']}, {r['resume_s']} | {r['final_lines']:,} | {r['duplicate_paid_answers']}"
                       f"{fmt_before_exit(r)} |")
        out.append("")
        out += [f"- {label}: {fmt_checks(r['problems'])}" for label, r in results["sigint"].items()]
        out.append("")
    if "double_sigint" in results:
        r = results["double_sigint"]
        out += ["## 3. A second Ctrl-C", ""]
        if "exit" in r:
            out += [f"SIGINT at 5 s, a second one 0.5 s later: exit status {r['exit']}, "
                    f"{r['last_signal_to_exit_s']} s after the second SIGINT; {r['lines_at_exit']:,} complete lines, "
                    f"torn/garbage {int(bool(r['torn_bytes_at_exit'])) + r['garbage_at_exit']}; "
                    f"{r['in_flight_at_sigint_logged']} requests were in flight at the first SIGINT. The resume exited "
                    f"{r['resume_exit']} after {r['resume_s']} s with {r['final_lines']:,} lines; duplicate paid answers "
                    f"{r['duplicate_paid_answers']}{fmt_before_exit(r)}.", ""]
        out += [fmt_checks(r["problems"]), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("kill9", "sigint", "double_sigint"), action="append")
    parser.add_argument("--seed", type=int, default=1, help="seeds the kill moments and the server (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (request and save files)")
    parser.add_argument("--logging_level", default="INFO", help="the processor's logging level (default INFO)")
    args = parser.parse_args(argv)
    global LOGGING_LEVEL
    LOGGING_LEVEL = args.logging_level
    parts = args.only or ["kill9", "sigint", "double_sigint"]
    started, load_before = time.monotonic(), os.getloadavg()
    results: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="crash_safety_"))
    try:
        for part in parts:
            print(f"running {part} ...", file=sys.stderr, flush=True)
            if part == "kill9":
                results["kill9"] = run_kill9(workdir / "kill9", seed=args.seed)
            elif part == "sigint":
                results["sigint"] = run_sigint(workdir / "sigint")
            else:
                results["double_sigint"] = run_double_sigint(workdir / "double_sigint")
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    runtime = time.monotonic() - started
    print(f"# Crash safety of api_request_parallel_processor.py\n\nRuntime {runtime:.0f} s; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs; other work on the "
          f"machine slows the server thread and the processor alike); logs in {LOGS.relative_to(ROOT)}/.\n")
    print(report(results))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "crash_safety.json").write_text(json.dumps({**results, "runtime_s": round(runtime, 1)}, indent=2,
                                                      default=str))
    problems = [p for r in results.values() for p in (r.get("problems") if "problems" in r else
                                                     [q for sub in r.values() for q in sub["problems"]])]
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

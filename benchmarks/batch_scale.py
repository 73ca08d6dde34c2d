"""Batch mode at scale, after a kill -9, and with errored or expired items, against the fake server.

    python benchmarks/batch_scale.py            # about 2-3 minutes on 2 cores

1. 250,000 tiny requests (metadata {"row": i}) through --batch: batches created (3: the API's limit is
   100,000 requests a batch), one result line per input line, each row's metadata back beside its own
   request, the processor's peak RSS (psutil, every 100 ms) against the input file size, wall time.
2. kill -9 once the state file lists the batch: the same command again must poll that batch, submit
   nothing new (the server's batches_created is unchanged) and end with one line per input line.
3. 5% errored and 5% expired items on 2,000 lines: failure lines and exit status 1; with both rates set
   to 0 the same command resubmits exactly the failed lines and ends with one success line per input line.

The processor runs as a subprocess with a dummy key; the server runs in a thread of this process. Child
logs go to benchmarks/out/logs/batch_scale_*.log. Exits 1 if any check fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from fake_server import ServerConfig, ServerThread  # noqa: E402

PROCESSOR = ROOT / "api_request_parallel_processor.py"
LOGS = ROOT / "benchmarks" / "out" / "logs"
MODEL = "claude-haiku-4-5"
ENV = {**os.environ, "ANTHROPIC_API_KEY": "benchmark", "NO_PROXY": "127.0.0.1,localhost",
       "no_proxy": "127.0.0.1,localhost"}

checks: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    checks.append((name, bool(ok), detail))
    return bool(ok)


def write_requests(path: Path, count: int) -> None:
    with open(path, "w") as file:
        for i in range(count):
            file.write(json.dumps({"model": MODEL, "max_tokens": 8,
                                   "messages": [{"role": "user", "content": f"row {i}"}],
                                   "metadata": {"row": i}}, separators=(",", ":")) + "\n")


def command(requests: Path, save: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, str(PROCESSOR), "--requests_filepath", str(requests), "--save_filepath", str(save),
            "--request_url", url, "--batch", "--batch_poll_interval", "0.5", "--no_progress",
            "--max_attempts", "3", *extra]


def start(cmd: list[str], log_name: str) -> tuple[subprocess.Popen, object]:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"batch_scale_{log_name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT), log


def run_sampled(cmd: list[str], log_name: str, timeout: float = 600) -> dict:
    """Run to the end, sampling the child's RSS every 100 ms."""
    started = time.monotonic()
    process, log = start(cmd, log_name)
    watched = psutil.Process(process.pid)
    peak, samples = 0, 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
            samples += 1
        except psutil.Error:
            pass
        if time.monotonic() - started > timeout:
            process.kill()
        time.sleep(0.1)
    log.close()
    return {"rc": process.returncode, "wall": time.monotonic() - started, "peak_rss": peak, "samples": samples}


def analyse(save: Path, expected_rows: int) -> dict:
    """Count lines, successes, failures; each row's metadata once, beside its own request."""
    lines = successes = failures = mismatched = 0
    rows: Counter = Counter()
    failed_rows: set[int] = set()
    if save.exists():
        with open(save, "rb") as file:
            for raw in file:
                lines += 1
                record = json.loads(raw)
                row = record[2]["row"] if len(record) == 3 and isinstance(record[2], dict) else None
                rows[row] += 1
                if record[0]["messages"][0]["content"] != f"row {row}":
                    mismatched += 1
                if isinstance(record[1], dict) and record[1].get("type") == "message":
                    successes += 1
                else:
                    failures += 1
                    failed_rows.add(row)
    rows_once = len(rows) == expected_rows and all(rows[i] == 1 for i in range(expected_rows))
    return {"lines": lines, "successes": successes, "failures": failures, "mismatched": mismatched,
            "rows_once": rows_once, "duplicated_rows": sum(1 for n in rows.values() if n > 1),
            "missing_rows": sum(1 for i in range(expected_rows) if i not in rows), "failed_rows": failed_rows}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def scale(folder: Path, count: int = 250_000) -> dict:
    requests, save = folder / f"scale_{count}.jsonl", folder / f"scale_{count}_results.jsonl"
    write_requests(requests, count)
    size = requests.stat().st_size
    with ServerThread(ServerConfig(batch_processing_seconds=2, output_tokens=(2, 4))) as server:
        result = run_sampled(command(requests, save, server.messages_url), f"1_scale_{count}")
        created = server.stats_snapshot()["batches_created"]
        sizes = sorted(len(b.custom_ids) for b in server.server._batches.values())
    found = analyse(save, count)
    label = f"1. {count:,}:"
    check(f"{label} exit status 0", result["rc"] == 0, str(result["rc"]))
    expected = -(-count // 100_000)
    check(f"{label} batches created == {expected}", created == expected, f"{created} ({sizes})")
    check(f"{label} one line per input line", found["lines"] == count, f"{found['lines']:,} of {count:,}")
    check(f"{label} all lines are successes", found["successes"] == count, f"{found['failures']:,} failures")
    check(f"{label} each row's metadata exactly once", found["rows_once"],
          f"missing {found['missing_rows']}, duplicated {found['duplicated_rows']}")
    check(f"{label} metadata beside its own request", found["mismatched"] == 0, f"{found['mismatched']} mismatched")
    check(f"{label} state file removed", not (folder / (save.name + ".batch_state.json")).exists())
    return {"count": count, "input_bytes": size, "output_bytes": save.stat().st_size if save.exists() else 0,
            "batches": created, "batch_sizes": sizes, **result, **{k: v for k, v in found.items() if k != "failed_rows"}}


def kill_resume(folder: Path, count: int = 30_000) -> dict:
    requests, save = folder / "kill.jsonl", folder / "kill_results.jsonl"
    state_path = save.with_name(save.name + ".batch_state.json")
    write_requests(requests, count)
    with ServerThread(ServerConfig(batch_processing_seconds=20, output_tokens=(2, 4))) as server:
        cmd = command(requests, save, server.messages_url)
        started = time.monotonic()
        process, log = start(cmd, "2_before_kill")
        ids: list[str] = []
        while time.monotonic() - started < 60 and process.poll() is None:
            try:
                state = json.loads(state_path.read_text())
                ids = [b["id"] for b in state.get("batches", [])]
                if ids and state.get("pending_since") is None:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        seen_after = time.monotonic() - started
        alive = process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
        created_before = server.stats_snapshot()["batches_created"]
        lines_at_kill = sum(1 for _ in open(save, "rb")) if save.exists() else 0
        second = run_sampled(cmd, "2_after_kill")
        created_after = server.stats_snapshot()["batches_created"]
    found = analyse(save, count)
    check("2. state file listed the batch before the kill", bool(ids) and alive, f"{ids} after {seen_after:.1f} s")
    check("2. rerun exit status 0", second["rc"] == 0, str(second["rc"]))
    check("2. no new batch after the kill", created_after == created_before == len(ids),
          f"{created_before} -> {created_after}")
    check("2. one line per input line", found["lines"] == count and found["rows_once"],
          f"{found['lines']:,} of {count:,}")
    check("2. all successes", found["successes"] == count, f"{found['failures']:,} failures")
    return {"count": count, "state_seen_s": seen_after, "batch_ids": ids, "lines_at_kill": lines_at_kill,
            "created_before": created_before, "created_after": created_after, "rerun_wall": second["wall"],
            "lines": found["lines"], "successes": found["successes"]}


def errors_retry(folder: Path, count: int = 2_000) -> dict:
    requests, save = folder / "errors.jsonl", folder / "errors_results.jsonl"
    write_requests(requests, count)
    config = ServerConfig(batch_processing_seconds=1, batch_error_rate=0.05, batch_expire_rate=0.05,
                          output_tokens=(2, 4))
    with ServerThread(config) as server:
        cmd = command(requests, save, server.messages_url)
        first = run_sampled(cmd, "3_first")
        after_first = analyse(save, count)
        known = set(server.server._batches)
        server.set_config(batch_error_rate=0.0, batch_expire_rate=0.0)
        second = run_sampled(cmd, "3_second")
        new = [b for i, b in server.server._batches.items() if i not in known]
    after_second = analyse(save, count)
    resubmitted = {int(c.removeprefix("line-")) - 1 for b in new for c in b.custom_ids}  # line n holds row n-1
    failures = after_first["failed_rows"]
    check("3. first run exit status 1", first["rc"] == 1, str(first["rc"]))
    check("3. failures ~10% and one line per input", 0 < len(failures) and after_first["lines"] == count,
          f"{len(failures)} failures, {after_first['lines']:,} lines")
    check("3. one new batch of exactly the failures", len(new) == 1 and resubmitted == failures,
          f"{len(new)} batch(es), {sum(len(b.custom_ids) for b in new)} requests vs {len(failures)} failures")
    check("3. second run exit status 0", second["rc"] == 0, str(second["rc"]))
    check("3. one success line per input line", after_second["lines"] == count
          and after_second["successes"] == count and after_second["rows_once"],
          f"{after_second['lines']:,} lines, {after_second['successes']:,} successes")
    return {"count": count, "first_rc": first["rc"], "failures": len(failures),
            "resubmitted": sum(len(b.custom_ids) for b in new), "second_rc": second["rc"],
            "final_lines": after_second["lines"], "final_successes": after_second["successes"]}


def main() -> int:
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="batch_scale-") as tmp:
        folder = Path(tmp)
        small = scale(folder, 25_000)  # a tenth of the size: does the peak RSS grow with the file?
        one = scale(folder)
        two = kill_resume(folder)
        three = errors_retry(folder)
    print("## Batch mode at scale\n")
    print("| requests | input file | output file | batches (sizes) | peak RSS | RSS / input | wall |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for row in (small, one):
        print(f"| {row['count']:,} | {mib(row['input_bytes'])} | {mib(row['output_bytes'])} | {row['batches']} "
              f"({', '.join(f'{s:,}' for s in row['batch_sizes'])}) | {mib(row['peak_rss'])} | "
              f"{row['peak_rss'] / row['input_bytes']:.2f}x | {row['wall']:.1f} s |")
    growth = one["peak_rss"] - small["peak_rss"]
    print(f"\nPeak RSS grew {mib(growth)} for {mib(one['input_bytes'] - small['input_bytes'])} more input "
          f"({growth / (one['count'] - small['count']):.0f} bytes per extra request).")
    print(f"\n{one['lines']:,} result lines, {one['successes']:,} successes, rows each once: {one['rows_once']}, "
          f"metadata mismatched: {one['mismatched']} (RSS sampled {one['samples']} times)\n")
    print("## kill -9 after submission\n")
    print(f"{two['count']:,} lines, batch_processing_seconds=20: state file listed {len(two['batch_ids'])} batch(es) "
          f"after {two['state_seen_s']:.1f} s; killed with {two['lines_at_kill']:,} result lines written. "
          f"batches_created {two['created_before']} -> {two['created_after']} after the rerun; the rerun took "
          f"{two['rerun_wall']:.1f} s and left {two['lines']:,} lines ({two['successes']:,} successes).\n")
    print("## Errored and expired items\n")
    print(f"{three['count']:,} lines, 5% errored + 5% expired: exit {three['first_rc']}, {three['failures']} failure "
          f"lines. Rates set to 0, same command: {three['resubmitted']} resubmitted, exit {three['second_rc']}, "
          f"{three['final_lines']:,} lines, {three['final_successes']:,} successes.\n")
    print("## Checks\n")
    print("| check | result | detail |")
    print("|---|---|---|")
    for name, ok, detail in checks:
        print(f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |")
    print(f"\nTotal runtime {time.monotonic() - begun:.0f} s")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

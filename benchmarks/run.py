"""Benchmarks of api_request_parallel_processor.py against the fake Anthropic server (tests/fake_server.py).

    python benchmarks/run.py                 # full run, about 5 minutes
    python benchmarks/run.py --quick         # smoke version, about 1 minute
    python benchmarks/run.py --only memory   # one section: efficiency, overhead, memory, baseline, chart

Prints markdown tables and writes benchmarks/out/results.json and benchmarks/out/chart.png (plus the
logs of every child process in benchmarks/out/logs/). All traffic goes to 127.0.0.1; the fake server is
started here. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROCESSOR = ROOT / "api_request_parallel_processor.py"
FAKE_SERVER = ROOT / "tests" / "fake_server.py"
OUT = HERE / "out"
LOGS = OUT / "logs"
PY = sys.executable
MODEL = "claude-sonnet-4-5"
API_KEY = "bench-not-a-real-key"
STOP_ESCALATION_SECONDS = 15.0  # after a SIGINT, wait this long before a second one, then SIGKILL
MEMORY_CONCURRENCY = 1000  # the same cap on requests in flight for both memory runs

sys.path.insert(0, str(ROOT / "tests"))
import fake_server as fs  # noqa: E402  (the fake server is imported, never modified)

BASELINE_CLIENTS = ("processor", "semaphore_baseline")
OVERHEAD_CLIENTS = ("ceiling", "ceiling_trust_env", "processor")
SECTIONS = ("efficiency", "overhead", "memory", "baseline", "chart")

# Sizes of the full run and of --quick.
FULL = dict(
    latency=(0.5, 5.0), target_seconds=20.0,
    n_rpm=3000, n_itpm=2000, n_otpm=2000, n_mix=600, mix_block=50,
    overhead_n=20_000, overhead_concurrency=64,
    memory_small=10_000, memory_big=1_000_000, memory_stop_after=10_000,
    baseline_workloads=[("tier2", 1.0, 220), ("tier2_x0.3", 0.3, 80)],
)
QUICK = dict(
    latency=(0.2, 1.0), target_seconds=4.0,
    n_rpm=600, n_itpm=400, n_otpm=400, n_mix=200, mix_block=25,
    overhead_n=3000, overhead_concurrency=64,
    memory_small=2000, memory_big=100_000, memory_stop_after=2000,
    baseline_workloads=[("tier2", 1.0, 200), ("tier2_x0.3", 0.3, 40)],
)


# ======================================================================================================
# Helpers: workloads, child processes, the fake server
# ======================================================================================================

_vocab_rng = random.Random(1234)
VOCAB = ["".join(_vocab_rng.choices(string.ascii_lowercase, k=_vocab_rng.randint(2, 9))) for _ in range(2000)]


def text_of(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(VOCAB, k=words))


def body_of(text: str, max_tokens: int) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}


def write_jsonl(path: Path, bodies: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for body in bodies:
            file.write(json.dumps(body) + "\n")


def predicted_output(body: dict, config: fs.ServerConfig) -> int:
    """The output tokens the fake server will produce for this (non-streamed, plain text) body."""
    seed = int(fs.body_fingerprint(body)[:16], 16) ^ config.seed
    wanted = random.Random(seed).randint(*config.output_tokens)
    return min(wanted, body["max_tokens"])


def server_demand(bodies: list[dict], config: fs.ServerConfig) -> tuple[int, int, int]:
    """(requests, input tokens, output tokens) the server will charge for these bodies, none cached."""
    return (len(bodies), sum(fs.count_input_tokens(b) for b in bodies),
            sum(predicted_output(b, config) for b in bodies))


def limit_for(demand: float, target_seconds: float) -> int:
    """The per-minute limit under which `demand` takes target_seconds past the full initial bucket."""
    return max(1, round(demand / (1.0 + target_seconds / 60.0)))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ANTHROPIC_API_KEY"] = API_KEY
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.pop("APPP_BACKOFF_SCALE", None)
    return env


def processor_cmd(requests: Path, save: Path, url: str, rpm: float, itpm: float, otpm: float,
                  *extra: str) -> list[str]:
    return [PY, str(PROCESSOR), "--requests_filepath", str(requests), "--save_filepath", str(save),
            "--request_url", url, "--max_requests_per_minute", f"{rpm:g}", "--max_tokens_per_minute", f"{itpm:g}",
            "--max_output_tokens_per_minute", f"{otpm:g}", "--overwrite", "--no_progress", "--logging_level", "INFO",
            *extra]


def run_child(cmd: list[str], name: str, *, timeout: float, cwd: Path, sample_rss: bool = False,
              stop_when: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run a child to its end, polling every 50 ms (bounded by `timeout`, then killed).

    Returns exit code, wall seconds, the child's own CPU (os.wait4 rusage), its peak RSS (ru_maxrss and,
    with sample_rss, the peak of 50 ms psutil samples), when stop_when() first held (SIGINT sent then),
    and its stdout.
    """
    LOGS.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = LOGS / f"{name}.out", LOGS / f"{name}.log"
    processor_version = processor_digest() if str(PROCESSOR) in cmd else None
    if processor_version:
        PROCESSOR_VERSIONS_SEEN.add(processor_version)
    started = time.monotonic()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=child_env())
    watched = psutil.Process(proc.pid)
    peak_sampled = samples = high_water = 0
    sigint_at = None
    signals_sent: list[tuple[str, float]] = []
    killed = False
    deadline = started + timeout
    status = rusage = None
    for _ in range(int(timeout / 0.05) + 1000):  # bounded; the deadline below ends it sooner
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.monotonic()
        if sample_rss:
            with contextlib.suppress(psutil.Error, OSError, ValueError):
                peak_sampled = max(peak_sampled, watched.memory_info().rss)
                samples += 1
                high_water = max(high_water, vm_hwm_bytes(proc.pid))
        if stop_when is not None and sigint_at is None and stop_when():
            proc.send_signal(signal.SIGINT)
            sigint_at = now - started
            signals_sent.append(("SIGINT", round(sigint_at, 2)))
        elif (sigint_at is not None and len(signals_sent) < 3
              and now - started > sigint_at + STOP_ESCALATION_SECONDS * len(signals_sent)):
            # The first SIGINT was not acted on in time: a second SIGINT (the processor then exits at once),
            # then SIGKILL. Both are recorded, because an ignored SIGINT is a finding.
            kind = ("SIGINT", signal.SIGINT) if len(signals_sent) == 1 else ("SIGKILL", signal.SIGKILL)
            proc.send_signal(kind[1])
            signals_sent.append((kind[0], round(now - started, 2)))
        if now > deadline and not killed:
            proc.kill()
            killed = True
            _, status, rusage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    else:
        proc.kill()
        killed = True
        _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"name": name, "exit": proc.returncode, "wall_s": wall, "killed_at_timeout": killed,
            "cpu_user_s": rusage.ru_utime, "cpu_sys_s": rusage.ru_stime,
            # ru_maxrss of a child counts the forked copy of this process before exec: not the child's own peak.
            "ru_maxrss_mb": rusage.ru_maxrss / 1024.0, "peak_rss_sampled_mb": peak_sampled / 2**20,
            "vm_hwm_mb": high_water / 2**20,
            "rss_samples": samples, "sigint_at_s": sigint_at, "signals_sent": signals_sent,
            "processor_version": processor_version,
            "stdout": stdout_path.read_text(errors="replace").strip()}


PROCESSOR_VERSIONS_SEEN: set[str] = set()


def processor_digest() -> str:
    """A short hash of the processor file as it is now (it may be edited while benchmarks run)."""
    return hashlib.sha256(PROCESSOR.read_bytes()).hexdigest()[:12]


def vm_hwm_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's RSS since exec (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """tests/fake_server.py in its own process (so the client's CPU and memory are its own)."""

    def __init__(self, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.messages_url = f"{self.base}/v1/messages"
        LOGS.mkdir(parents=True, exist_ok=True)
        self._log = open(LOGS / f"fake_server_{self.port}.log", "wb")
        self.proc = subprocess.Popen([PY, str(FAKE_SERVER), "--port", str(self.port), *extra],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=child_env())
        deadline = time.monotonic() + 15
        while True:
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the fake server process did not start") from None
                time.sleep(0.1)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/__stats", timeout=10) as response:
            return json.loads(response.read())

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def count_lines(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    return 0


class LineWatcher:
    """Counts the lines of a growing file incrementally (cheap enough to call every 50 ms)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def count(self) -> int:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as file:
            file.seek(self.offset)
            chunk = file.read()
            self.offset += len(chunk)
            self.lines += chunk.count(b"\n")
        return self.lines


# ======================================================================================================
# 1. Efficiency under limits
# ======================================================================================================

BUCKETS = ("requests", "input", "output")


def timeline_bins(admitted: list, first: float, seconds: int) -> dict[str, list[float]]:
    bins = {kind: [0.0] * seconds for kind in BUCKETS}
    for moment, requests, input_tokens, output_tokens in admitted:
        index = int(moment - first)
        if 0 <= index < seconds:
            bins["requests"][index] += requests
            bins["input"][index] += input_tokens
            bins["output"][index] += output_tokens
    return bins


def analyse(stats: dict, limits: fs.ModelLimits, mean_latency: float) -> dict[str, Any]:
    """Theoretical minimum makespan vs the measured one, from what the server actually charged."""
    admitted = stats["admitted"]
    demand = {"requests": len(admitted) or stats["successes"], "input": stats["input_tokens_charged"],
              "output": stats["output_tokens_charged"]}
    capacity = {"requests": limits.requests_per_minute, "input": limits.input_tokens_per_minute,
                "output": limits.output_tokens_per_minute}
    per_bucket = {kind: max(0.0, demand[kind] - capacity[kind]) / (capacity[kind] / 60.0) for kind in BUCKETS}
    binding = max(per_bucket, key=per_bucket.__getitem__)
    ideal_admission = per_bucket[binding]
    theoretical = ideal_admission + mean_latency
    first, last_done = stats["first_admission_time"], stats["last_completion_time"]
    measured = (last_done - first) if first is not None and last_done is not None else float("nan")
    last_admission = max((a[0] for a in admitted), default=first or 0.0) - (first or 0.0)
    span = int(measured) + 2 if measured == measured else 1
    return {"demand": demand, "capacity": capacity, "seconds_past_capacity": per_bucket, "binding": binding,
            "theoretical_min_s": theoretical, "measured_makespan_s": measured,
            "efficiency": theoretical / measured if measured > 0 else float("nan"),
            "ideal_last_admission_s": ideal_admission, "last_admission_s": last_admission,
            "admission_efficiency": (ideal_admission / last_admission) if last_admission > 0 else float("nan"),
            # The ideal client against the same latency tail as the measured run (the time from the last
            # admission to the last completion is the service's latency, not the scheduler's doing).
            "efficiency_same_tail": ((ideal_admission + measured - last_admission) / measured
                                     if measured > 0 else float("nan")),
            "rate_limited_429": stats["rate_limited"], "successes": stats["successes"],
            "max_in_flight": stats["max_in_flight"], "bins": timeline_bins(admitted, first or 0.0, span)}


def efficiency_run(name: str, bodies: list[dict], config: fs.ServerConfig, workdir: Path) -> dict[str, Any]:
    limits = config.limits["default"]
    requests, save = workdir / f"{name}.jsonl", workdir / f"{name}_results.jsonl"
    write_jsonl(requests, bodies)
    mean_latency = sum(config.latency_seconds) / 2
    with fs.ServerThread(config, record_timeline=True) as server:
        cmd = processor_cmd(requests, save, server.messages_url, limits.requests_per_minute,
                            limits.input_tokens_per_minute, limits.output_tokens_per_minute)
        child = run_child(cmd, f"efficiency_{name}", timeout=240, cwd=workdir)
        stats = server.stats_snapshot()
    result = analyse(stats, limits, mean_latency)
    result.update(name=name, n=len(bodies), limits=[limits.requests_per_minute, limits.input_tokens_per_minute,
                                                    limits.output_tokens_per_minute],
                  wall_s=child["wall_s"], exit=child["exit"], result_lines=count_lines(save),
                  cpu_s=child["cpu_user_s"] + child["cpu_sys_s"], processor_version=child["processor_version"])
    print(f"  {name}: {result['efficiency']:.3f} efficiency, {result['rate_limited_429']} x 429, "
          f"makespan {result['measured_makespan_s']:.1f} s (ideal {result['theoretical_min_s']:.1f} s), "
          f"exit {child['exit']}", flush=True)
    return result


def section_efficiency(p: dict, workdir: Path) -> dict[str, Any]:
    rng = random.Random(1)
    target, latency = p["target_seconds"], p["latency"]
    runs = []

    # RPM-bound: tiny prompts and answers; only the request bucket can run short.
    config = fs.ServerConfig(latency_seconds=latency, output_tokens=(20, 60))
    bodies = [body_of(text_of(rng, rng.randint(5, 15)), 64) for _ in range(p["n_rpm"])]
    n, d_in, d_out = server_demand(bodies, config)
    config.limits = {"default": fs.ModelLimits(limit_for(n, target), d_in * 10, d_out * 10)}
    runs.append(efficiency_run("rpm_bound", bodies, config, workdir))

    # Input-token-bound: prompts of about 1,000 tokens, short answers.
    config = fs.ServerConfig(latency_seconds=latency, output_tokens=(20, 60))
    bodies = [body_of(text_of(rng, rng.randint(400, 800)), 64) for _ in range(p["n_itpm"])]
    n, d_in, d_out = server_demand(bodies, config)
    config.limits = {"default": fs.ModelLimits(n * 10, limit_for(d_in, target), d_out * 10)}
    runs.append(efficiency_run("input_bound", bodies, config, workdir))

    # Output-token-bound: short prompts, answers of 100-700 tokens (max_tokens 1,000).
    config = fs.ServerConfig(latency_seconds=latency, output_tokens=(100, 700))
    bodies = [body_of(text_of(rng, rng.randint(5, 15)), 1000) for _ in range(p["n_otpm"])]
    n, d_in, d_out = server_demand(bodies, config)
    config.limits = {"default": fs.ModelLimits(n * 10, d_in * 10, limit_for(d_out, target))}
    runs.append(efficiency_run("output_bound", bodies, config, workdir))

    # Each bucket binds in turn: blocks of input-heavy (~3,000 input, 40 output) and output-heavy
    # (~20 input, 1,000-1,400 output) requests alternate; 1,200 RPM; both token limits set so that
    # each would need target_seconds past its full bucket.
    config = fs.ServerConfig(latency_seconds=latency, output_tokens=(1000, 1400))
    bodies = []
    for index in range(p["n_mix"]):
        if (index // p["mix_block"]) % 2 == 0:
            bodies.append(body_of(text_of(rng, rng.randint(1500, 2100)), 40))
        else:
            bodies.append(body_of(text_of(rng, rng.randint(5, 15)), 1500))
    n, d_in, d_out = server_demand(bodies, config)
    config.limits = {"default": fs.ModelLimits(1200, limit_for(d_in, target), limit_for(d_out, target))}
    runs.append(efficiency_run("mixed_in_turn", bodies, config, workdir))
    return {"runs": runs, "latency": latency, "target_seconds": target}


# ======================================================================================================
# 2. Overhead
# ======================================================================================================


def section_overhead(p: dict, workdir: Path) -> dict[str, Any]:
    rng = random.Random(2)
    n, concurrency = p["overhead_n"], p["overhead_concurrency"]
    requests = workdir / "overhead.jsonl"
    write_jsonl(requests, [body_of(f"ping {rng.randint(0, 10**9)}", 32) for _ in range(n)])
    results = {}
    for client in OVERHEAD_CLIENTS:
        with ServerProcess() as server:  # limits of a million per minute, zero latency: never binding
            if client.startswith("ceiling"):
                cmd = [PY, str(HERE / "ceiling.py"), "--requests_filepath", str(requests),
                       "--request_url", server.messages_url, "--concurrency", str(concurrency)]
                if client == "ceiling_trust_env":
                    cmd.append("--trust_env")
            else:
                cmd = processor_cmd(requests, workdir / "overhead_results.jsonl", server.messages_url, 1e9, 1e12, 1e12,
                                    "--max_concurrent_requests", str(concurrency))
            server_cpu_before = server.cpu_seconds()
            child = run_child(cmd, f"overhead_{client}", timeout=300, cwd=workdir)
            server_cpu = server.cpu_seconds() - server_cpu_before
            stats = server.stats()
        span = stats["last_completion_time"] - stats["first_admission_time"]
        cpu = child["cpu_user_s"] + child["cpu_sys_s"]
        results[client] = {"exit": child["exit"], "successes": stats["successes"], "span_s": span,
                           "wall_s": child["wall_s"], "req_per_s": n / span, "req_per_s_wall": n / child["wall_s"],
                           "cpu_s": cpu, "cpu_ms_per_request": 1000 * cpu / n,
                           "server_cpu_ms_per_request": 1000 * server_cpu / n, "max_in_flight": stats["max_in_flight"],
                           "processor_version": child["processor_version"]}
        print(f"  {client}: {results[client]['req_per_s']:.0f} req/s, "
              f"{results[client]['cpu_ms_per_request']:.3f} CPU ms/request, exit {child['exit']}", flush=True)
    results["ratio"] = results["processor"]["req_per_s"] / results["ceiling"]["req_per_s"]
    results["ratio_vs_trust_env_ceiling"] = (results["processor"]["req_per_s"]
                                             / results["ceiling_trust_env"]["req_per_s"])
    results["ratio_wall"] = results["processor"]["req_per_s_wall"] / results["ceiling"]["req_per_s_wall"]
    results.update(n=n, concurrency=concurrency)
    return results


# ======================================================================================================
# 3. Memory
# ======================================================================================================


def write_tiny_requests(path: Path, lines: int) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for start in range(0, lines, 10_000):
            file.write("".join(
                f'{{"model": "{MODEL}", "max_tokens": 16, "messages": [{{"role": "user", "content": '
                f'"request number {index} of the memory benchmark"}}], "metadata": {{"row": {index}}}}}\n'
                for index in range(start, min(lines, start + 10_000))))


def section_memory(p: dict, workdir: Path) -> dict[str, Any]:
    small, big, stop_after = p["memory_small"], p["memory_big"], p["memory_stop_after"]
    temp = Path(tempfile.mkdtemp(prefix="appp-memory-"))
    runs = []
    try:
        with ServerProcess() as server:
            for lines in (small, big):
                requests, save = temp / f"requests_{lines}.jsonl", temp / f"results_{lines}.jsonl"
                write_tiny_requests(requests, lines)
                watcher = LineWatcher(save)
                stop_when = (lambda w=watcher: w.count() >= stop_after) if lines > stop_after else None
                cmd = processor_cmd(requests, save, server.messages_url, 1e9, 1e12, 1e12,
                                    "--max_concurrent_requests", str(MEMORY_CONCURRENCY))
                child = run_child(cmd, f"memory_{lines}", timeout=300, cwd=temp, sample_rss=True, stop_when=stop_when)
                runs.append({"lines": lines, "file_mb": requests.stat().st_size / 2**20, "completed": count_lines(save),
                             "exit": child["exit"], "peak_rss_sampled_mb": child["peak_rss_sampled_mb"],
                             "vm_hwm_mb": child["vm_hwm_mb"], "rss_samples": child["rss_samples"],
                             "signals_sent": child["signals_sent"], "wall_s": child["wall_s"],
                             "processor_version": child["processor_version"]})
                print(f"  {lines:,} lines: peak RSS {child['peak_rss_sampled_mb']:.1f} MB "
                      f"(VmHWM {child['vm_hwm_mb']:.1f} MB), {runs[-1]['completed']:,} done, "
                      f"exit {child['exit']}, signals {child['signals_sent']}", flush=True)
                requests.unlink()
                save.unlink(missing_ok=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    difference = abs(runs[1]["peak_rss_sampled_mb"] - runs[0]["peak_rss_sampled_mb"])
    return {"runs": runs, "difference_mb": difference, "within_20_mb": difference <= 20.0,
            "concurrency": MEMORY_CONCURRENCY,
            "temp_deleted": not temp.exists()}


# ======================================================================================================
# 4. Against the usual alternative
# ======================================================================================================


def section_baseline(p: dict, workdir: Path) -> dict[str, Any]:
    """Tier 2 limits (1,000 RPM, 450k ITPM, 90k OTPM) times a scale, the same file for both clients.

    Requests of ~1,500 input and 200-800 output tokens, so the output limit binds. Two regimes: Tier 2 as it
    is (a Semaphore(10) client stays below the limits and is slowed by its own concurrency) and Tier 2 x 0.3
    (it sends faster than the output limit refills, so it meets 429s). The light clients all run at once,
    each against its own fake server, to keep the section short.
    """
    rng = random.Random(4)
    latency = p["latency"]
    tasks = []
    for workload, scale, n in p["baseline_workloads"]:
        limits = fs.ModelLimits(1000 * scale, 450_000 * scale, 90_000 * scale)
        bodies = [body_of(text_of(rng, rng.randint(600, 1200)), 1024) for _ in range(n)]
        requests = workdir / f"baseline_{workload}.jsonl"
        write_jsonl(requests, bodies)
        for client in BASELINE_CLIENTS:
            tasks.append((workload, scale, limits, requests, len(bodies), client))

    def run_one(task: tuple) -> dict[str, Any]:
        workload, scale, limits, requests, n, client = task
        config = fs.ServerConfig(limits={"default": limits}, latency_seconds=latency, output_tokens=(200, 800))
        save = workdir / f"baseline_{workload}_{client}_results.jsonl"
        with fs.ServerThread(config, record_timeline=True) as server:
            if client == "processor":
                cmd = processor_cmd(requests, save, server.messages_url, limits.requests_per_minute,
                                    limits.input_tokens_per_minute, limits.output_tokens_per_minute)
            else:
                cmd = [PY, str(HERE / "semaphore_baseline.py"), "--requests_filepath", str(requests),
                       "--save_filepath", str(save), "--request_url", server.messages_url]
            child = run_child(cmd, f"baseline_{workload}_{client}", timeout=400, cwd=workdir)
            stats = server.stats_snapshot()
        analysis = analyse(stats, limits, sum(latency) / 2)
        result = {key: analysis[key] for key in ("theoretical_min_s", "measured_makespan_s", "efficiency",
                                                 "rate_limited_429", "successes", "binding", "demand",
                                                 "admission_efficiency", "bins")}
        result.update(workload=workload, client=client, scale=scale, n=n, wall_s=child["wall_s"],
                      processor_version=child["processor_version"],
                      exit=child["exit"], result_lines=count_lines(save), failed=n - stats["successes"],
                      limits=[limits.requests_per_minute, limits.input_tokens_per_minute,
                              limits.output_tokens_per_minute])
        print(f"  {workload} {client}: makespan {analysis['measured_makespan_s']:.1f} s, "
              f"{stats['rate_limited']} x 429, {stats['successes']}/{n} succeeded, exit {child['exit']}", flush=True)
        return result

    with ThreadPoolExecutor(len(tasks)) as pool:
        runs = list(pool.map(run_one, tasks))
    return {"runs": runs, "latency": latency}


# ======================================================================================================
# 5. Chart
# ======================================================================================================


def section_chart(efficiency: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = efficiency["runs"]
    figure, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), squeeze=False)
    colours = {"requests": "tab:blue", "input": "tab:orange", "output": "tab:green"}
    for axis, run in zip(axes[:, 0], runs, strict=True):
        bins = run["bins"]
        seconds = len(bins["requests"])
        for kind, capacity in zip(BUCKETS, run["limits"], strict=True):
            per_second = capacity / 60.0
            share = [value / per_second for value in bins[kind]]
            label = f"{kind} ({'requests' if kind == 'requests' else 'tokens'}/s) / limit {per_second:,.0f}/s"
            axis.step(range(seconds), [max(value, 1e-3) for value in share], where="post",
                      color=colours[kind], label=label, linewidth=2 if kind == run["binding"] else 1)
        axis.axhline(1.0, color="black", linestyle="--", linewidth=1, label="limit (limit/60 per second)")
        axis.set_yscale("log")
        axis.set_ylim(0.01, 200)
        axis.set_xlim(0, seconds)
        axis.set_ylabel("admitted / limit rate")
        axis.set_title(f"{run['name']}: {run['n']:,} requests, binding {run['binding']}, "
                       f"efficiency {run['efficiency']:.2f}, {run['rate_limited_429']} x 429", fontsize=10)
        axis.legend(fontsize=7, loc="upper right")
        axis.grid(True, which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the first admission (1 s bins, server timeline)")
    figure.suptitle("Admissions per second as a share of each limit (the first bin holds the full initial bucket)",
                    fontsize=10)
    figure.tight_layout()
    path = OUT / "chart.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


# ======================================================================================================
# Report
# ======================================================================================================


def mixed_note(runs: list[dict]) -> str:
    mixed = next((r for r in runs if r["name"] == "mixed_in_turn"), None)
    if mixed is None:
        return ""
    return (f"mixed_in_turn: {mixed['n']:,} requests under a {mixed['limits'][0]:,.0f}-request bucket, so the request "
            "limit cannot bind; only the two token buckets can (blocks of input-heavy and output-heavy requests "
            "alternate).")


def fmt_signals(signals: list) -> str:
    return ", ".join(f"{name} at {moment:g}" for name, moment in signals) or "none"


def fmt_limits(limits: list[float]) -> str:
    return " / ".join(f"{value:,.0f}" for value in limits)


def markdown(results: dict, sections: tuple[str, ...] = SECTIONS) -> str:
    out = []
    results = {key: value for key, value in results.items() if key not in SECTIONS or key in sections}
    if "efficiency" in results:
        e = results["efficiency"]
        out += [f"### 1. Efficiency under limits (latency U{tuple(e['latency'])} s, processor limits = server limits)",
                "",
                "| workload | N | limits RPM / ITPM / OTPM | binding | theoretical min (s) | measured makespan (s) "
                "| efficiency | efficiency, same latency tail | admission efficiency | 429s | wall (s) | exit |",
                "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in e["runs"]:
            out.append(f"| {r['name']} | {r['n']:,} | {fmt_limits(r['limits'])} | {r['binding']} "
                       f"| {r['theoretical_min_s']:.1f} | {r['measured_makespan_s']:.1f} | {r['efficiency']:.3f} "
                       f"| {r['efficiency_same_tail']:.3f} | {r['admission_efficiency']:.3f} | {r['rate_limited_429']} | {r['wall_s']:.1f} "
                       f"| {r['exit']} |")
        out += ["", "Notes: theoretical min = max over buckets of max(0, charged - limit)/(limit/60) + mean latency; "
                "measured = server last completion - first admission. Admission efficiency compares only the last "
                "admission time with its ideal (no latency tail); 'same latency tail' gives the ideal client the "
                "measured run's time from last admission to last completion. " + mixed_note(e["runs"]), ""]
    if "overhead" in results:
        o = results["overhead"]
        out += [f"### 2. Overhead ({o['n']:,} tiny requests, zero latency, concurrency {o['concurrency']}, "
                "server in its own process)", "",
                "| client | req/s (server span) | req/s (wall) | client CPU ms/request | server CPU ms/request "
                "| exit |",
                "|---|---:|---:|---:|---:|---:|"]
        for client in OVERHEAD_CLIENTS:
            if client not in o:
                continue
            r = o[client]
            out.append(f"| {client} | {r['req_per_s']:,.0f} | {r['req_per_s_wall']:,.0f} "
                       f"| {r['cpu_ms_per_request']:.3f} | {r['server_cpu_ms_per_request']:.3f} | {r['exit']} |")
        out += ["", f"Ratio processor/ceiling: {o['ratio']:.2f} (server span), {o['ratio_wall']:.2f} (wall); "
                f"processor/ceiling_trust_env: {o['ratio_vs_trust_env_ceiling']:.2f}. ceiling_trust_env is the same "
                "minimal loop with ClientSession(trust_env=True): aiohttp then looks up proxies and .netrc in a "
                "worker thread for every request (the processor looks its proxy up once per run instead).", ""]
    if "memory" in results:
        m = results["memory"]
        out += ["### 3. Memory (peak RSS of the processor, sampled every 50 ms)", "",
                "| input lines | file (MB) | results written | peak RSS sampled (MB) | VmHWM (MB) "
                "| signals sent (s after start) | exit |",
                "|---:|---:|---:|---:|---:|---|---:|"]
        for r in m["runs"]:
            out.append(f"| {r['lines']:,} | {r['file_mb']:.1f} | {r['completed']:,} | {r['peak_rss_sampled_mb']:.1f} "
                       f"| {r['vm_hwm_mb']:.1f} | {fmt_signals(r['signals_sent'])} | {r['exit']} |")
        out += ["", f"Difference {m['difference_mb']:.1f} MB: {'within' if m['within_20_mb'] else 'NOT within'} 20 MB "
                f"(both runs capped at {m.get('concurrency', MEMORY_CONCURRENCY)} requests in flight; "
                f"the large run gets SIGINT once "
                f"{m['runs'][0]['lines']:,} results are written and should exit 130 after finishing what is in flight; "
                f"a second SIGINT after {STOP_ESCALATION_SECONDS:g} s, then SIGKILL, mean the first was ignored). "
                f"Temp files deleted: {m['temp_deleted']}.", ""]
    if "baseline" in results:
        b = results["baseline"]
        out += ["### 4. Against asyncio.gather + Semaphore(10) (Tier 2 limits x scale, "
                f"latency U{tuple(b['latency'])} s, ~1,500 input and 200-800 output tokens per request)", "",
                "| workload | limits RPM / ITPM / OTPM | N | client | makespan (s) | theoretical min (s) | efficiency "
                "| 429s | succeeded | wall (s) | exit |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in b["runs"]:
            out.append(f"| {r['workload']} | {fmt_limits(r['limits'])} | {r['n']} | {r['client']} "
                       f"| {r['measured_makespan_s']:.1f} | {r['theoretical_min_s']:.1f} | {r['efficiency']:.3f} "
                       f"| {r['rate_limited_429']} | {r['successes']}/{r['n']} | {r['wall_s']:.1f} | {r['exit']} |")
        out += ["", "The four clients run at the same time, each against its own fake server (they are light).", ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmarks of the parallel processor against the fake server.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about a minute in all")
    parser.add_argument("--only", choices=SECTIONS, help="run one section (chart: redraw from results.json)")
    parser.add_argument("--latency", help="LOW,HIGH seconds of server latency instead of 0.5,5 "
                                          "(e.g. 1,1: a fixed latency makes 'one latency' unambiguous)")
    args = parser.parse_args()
    params = dict(QUICK if args.quick else FULL)
    if args.latency:
        params["latency"] = tuple(float(part) for part in args.latency.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    results: dict[str, Any] = {}
    if args.only and results_path.exists():
        with contextlib.suppress(ValueError):
            results = json.loads(results_path.read_text())
    results["quick"] = args.quick
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="appp-bench-"))
    try:
        for section in ("efficiency", "overhead", "memory", "baseline"):
            if args.only in (None, section):
                print(f"## {section}", flush=True)
                section_started = time.monotonic()
                results[section] = globals()[f"section_{section}"](params, workdir)
                results[section]["section_seconds"] = time.monotonic() - section_started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.only in (None, "efficiency", "chart") and "efficiency" in results:
        results["chart"] = section_chart(results["efficiency"])
    results["total_seconds"] = time.monotonic() - started
    results["processor_versions"] = sorted(PROCESSOR_VERSIONS_SEEN)
    results_path.write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results, SECTIONS if args.only in (None, "chart") else (args.only,)))
    if len(PROCESSOR_VERSIONS_SEEN) > 1:
        print(f"WARNING: {PROCESSOR.name} changed while the benchmarks ran ({len(PROCESSOR_VERSIONS_SEEN)} versions; "
              "see processor_version in results.json): the figures mix versions.")
    elif PROCESSOR_VERSIONS_SEEN:
        print(f"Processor version (sha256 prefix): {next(iter(PROCESSOR_VERSIONS_SEEN))}")
    print(f"Total {results['total_seconds']:.0f} s. Wrote {results_path}" +
          (f" and {results['chart']}" if "chart" in results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

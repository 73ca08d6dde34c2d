"""Does the processor follow what the service's rate-limit headers say? Two acceptance figures:

    python benchmarks/limits_from_headers.py [--shared-only] [--stagger SECONDS ...] [--bound KIND ...]

1. `--max_requests_per_minute auto` (and the token limits auto) against a server that allows 3,000
   requests/min: the request rate after the first answer, against the default 40/min.
2. Two processes sharing one server's limits, each told it has all of it (the second starts a few
   seconds after the first, as two cron jobs would, or in the same second): both finish, and how many
   429s they received. `--bound input` or `--bound output` makes a token limit the binding one instead
   of the request limit.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from fake_server import ModelLimits, ServerConfig, ServerThread  # noqa: E402

SCRIPT = ROOT / "api_request_parallel_processor.py"
ENV = {"ANTHROPIC_API_KEY": "benchmark", "PATH": "/usr/bin:/bin"}


def write_requests(path: Path, count: int, tag: str, max_tokens: int = 100, padding: str = "") -> Path:
    with open(path, "w") as file:
        for i in range(count):
            file.write(json.dumps({"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "metadata": {"id": f"{tag}{i}"},
                                   "messages": [{"role": "user", "content": f"{tag} question {i}? {padding}"}]}) + "\n")
    return path


def auto_limits(folder: Path) -> None:
    limits = ModelLimits(requests_per_minute=3000, input_tokens_per_minute=3_000_000, output_tokens_per_minute=600_000)
    requests = write_requests(folder / "auto.jsonl", 1500, "a")
    with ServerThread(ServerConfig(limits={"default": limits}, latency_seconds=(0.2, 0.6)), record_timeline=True) as srv:
        started = time.monotonic()
        done = subprocess.run([sys.executable, SCRIPT, "--requests_filepath", requests, "--request_url",
                               srv.messages_url, "--max_requests_per_minute", "auto", "--max_tokens_per_minute", "auto",
                               "--max_output_tokens_per_minute", "auto"], capture_output=True, text=True, env=ENV)
        wall = time.monotonic() - started
        stats = srv.stats_snapshot()
    assert done.returncode == 0, done.stderr[-2000:]
    times = sorted(t for t, *_ in stats["admitted"])
    first_answer = times[0] + 0.2  # the first request's answer cannot come sooner than the least latency
    later = [t for t in times if t > first_answer + 1.0]
    rate = (len(later) - 1) / (later[-1] - later[0]) * 60 if len(later) > 1 else float("nan")
    print(f"auto: 1,500 requests in {wall:.1f} s; after the first answer {rate:,.0f} requests/min "
          f"= {rate / 40:.0f}x the default 40/min (target >= 20x); 429s: {stats['rate_limited']}")


# Which limit binds when two processes share the server: (server limits, requests per process, max_tokens,
# padding of each prompt, the fake model's output lengths).
BIG = 10_000_000
SHARED_WORKLOADS = {
    "requests": (ModelLimits(requests_per_minute=1200, input_tokens_per_minute=BIG, output_tokens_per_minute=BIG),
                 1500, 100, "", (20, 20)),
    "input": (ModelLimits(requests_per_minute=100_000, input_tokens_per_minute=600_000, output_tokens_per_minute=BIG),
              600, 100, " ".join(f"word{i}" for i in range(400)), (20, 20)),
    "output": (ModelLimits(requests_per_minute=100_000, input_tokens_per_minute=BIG, output_tokens_per_minute=30_000),
               200, 400, "", (50, 350)),
}


def shared(folder: Path, stagger_seconds: float, bound: str = "requests") -> None:
    limits, per_process, max_tokens, padding, output_tokens = SHARED_WORKLOADS[bound]
    config = ServerConfig(limits={"default": limits}, latency_seconds=(0.2, 1.0), output_tokens=output_tokens)
    name = f"{bound}_{stagger_seconds:g}"
    with ServerThread(config) as srv:
        processes = []
        for tag in ("a", "b"):
            requests = write_requests(folder / f"shared_{tag}_{name}.jsonl", per_process, tag, max_tokens, padding)
            processes.append(subprocess.Popen(
                [sys.executable, SCRIPT, "--requests_filepath", requests, "--request_url", srv.messages_url,
                 "--max_requests_per_minute", str(limits.requests_per_minute),
                 "--max_tokens_per_minute", str(limits.input_tokens_per_minute),
                 "--max_output_tokens_per_minute", str(limits.output_tokens_per_minute), "--max_attempts", "20",
                 "--summary_filepath", folder / f"summary_{tag}_{name}.json"], stderr=subprocess.DEVNULL, env=ENV))
            time.sleep(stagger_seconds)
        codes = [process.wait(timeout=600) for process in processes]
        stats = srv.stats_snapshot()
    summaries = [json.loads((folder / f"summary_{tag}_{name}.json").read_text()) for tag in ("a", "b")]
    total = 2 * per_process
    used, limit = {"requests": (total, limits.requests_per_minute),
                   "input": (stats["input_tokens_charged"], limits.input_tokens_per_minute),
                   "output": (stats["output_tokens_charged"], limits.output_tokens_per_minute)}[bound]
    print(f"two processes bound by {bound}, second started {stagger_seconds:g} s later: exit {codes}, "
          f"succeeded {[s['succeeded'] for s in summaries]}, 429s {stats['rate_limited']} "
          f"= {stats['rate_limited'] / total:.2%} of {total:,} requests (target < 2%); "
          f"elapsed {[round(s['elapsed_seconds'], 1) for s in summaries]} s "
          f"(the server's limit alone needs {max(0, used - limit) / (limit / 60):.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-only", action="store_true", help="skip the auto-limit run")
    parser.add_argument("--stagger", type=float, action="append",
                        help="seconds between the two processes' starts (repeatable; default 5 and 0)")
    parser.add_argument("--bound", choices=sorted(SHARED_WORKLOADS), action="append",
                        help="which limit binds the shared runs (repeatable; default requests)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.shared_only:
            auto_limits(folder)
        for bound in args.bound or ("requests",):
            for stagger in args.stagger or (5.0, 0.0):
                shared(folder, stagger, bound)


if __name__ == "__main__":
    main()

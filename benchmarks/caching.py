"""Does prompt caching pay off? The acceptance figures of the caching feature, against the fake server.

    python benchmarks/caching.py

1. 300 requests sharing one ~4,000-token cached system prompt, under an input-token limit that binds
   without caching: with --use_caching (and cache_control) versus the same job without cache_control.
   Reports cache writes, 429s and the makespan of each, and the speed-up.
2. 10 distinct cached prefixes (documents) with 30 requests each: how many cache writes.
"""

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from fake_server import ModelLimits, ServerConfig, ServerThread, count_input_tokens  # noqa: E402

MODEL = "claude-sonnet-4-5"
WORDS = "river lantern harbour meadow copper violet orchard signal cobble thunder quiet ember willow".split()


def document(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def requests(prefixes: int, per_prefix: int, cached: bool, words: int) -> list[dict]:
    rows = []
    for p in range(prefixes):
        doc = {"type": "text", "text": document(p, words)}
        if cached:
            doc["cache_control"] = {"type": "ephemeral"}
        for q in range(per_prefix):
            rows.append({"model": MODEL, "max_tokens": 50,
                         "system": [{"type": "text", "text": "You answer questions about the document."}, doc],
                         "messages": [{"role": "user", "content": f"Question {q} about document {p}?"}],
                         "metadata": {"prefix": p, "question": q}})
    return rows


def run(rows: list[dict], itpm: int, use_caching: bool, folder: Path, name: str) -> dict:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    limits = ModelLimits(requests_per_minute=1200, input_tokens_per_minute=itpm, output_tokens_per_minute=1_000_000)
    config = ServerConfig(limits={"default": limits}, latency_seconds=(0.3, 0.8), output_tokens=(20, 40))
    with ServerThread(config) as server:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(ROOT / "api_request_parallel_processor.py"), "--requests_filepath", path,
             "--request_url", server.messages_url, "--max_requests_per_minute", "1200", "--max_tokens_per_minute",
             str(itpm), "--max_output_tokens_per_minute", "1000000", "--use_caching", str(use_caching)],
            capture_output=True, text=True, env={"ANTHROPIC_API_KEY": "benchmark", "PATH": "/usr/bin:/bin"})
        wall = time.monotonic() - started
        stats = server.stats_snapshot()
    assert done.returncode == 0, done.stderr[-2000:]
    return {"name": name, "wall": wall, "makespan": stats["last_completion_time"] - stats["first_admission_time"],
            "cache_writes": stats["cache_writes"], "cache_reads": stats["cache_reads"], "429s": stats["rate_limited"],
            "prefixes_written": len(stats["cache_writes_by_prefix"]),
            "works_line": "Caching is enabled and working" in done.stderr}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cached_rows = requests(1, 300, True, 3000)
        per_request = count_input_tokens({k: v for k, v in cached_rows[0].items() if k != "metadata"})
        demand = per_request * 300
        itpm = int(demand / 1.5)  # without caching, the input bucket binds for about 30 s
        print(f"one shared prompt: {per_request:,} input tokens per request, {demand:,} in all; limit {itpm:,}/min")
        with_cache = run(cached_rows, itpm, True, folder, "with_caching")
        without = run(requests(1, 300, False, 3000), itpm, False, folder, "without_cache_control")
        ten = run(requests(10, 30, True, 3000), itpm, True, folder, "ten_prefixes")
    print("| run | makespan s | wall s | cache writes | cache reads | 429s |")
    print("|---|---|---|---|---|---|")
    for row in (with_cache, without, ten):
        print(f"| {row['name']} | {row['makespan']:.1f} | {row['wall']:.1f} | {row['cache_writes']} | "
              f"{row['cache_reads']} | {row['429s']} |")
    print(f"speed-up with caching: {without['makespan'] / with_cache['makespan']:.1f}x (makespan), "
          f"{without['wall'] / with_cache['wall']:.1f}x (wall)")
    print(f"ten prefixes: {ten['cache_writes']} cache writes over {ten['prefixes_written']} distinct prefixes")


if __name__ == "__main__":
    main()

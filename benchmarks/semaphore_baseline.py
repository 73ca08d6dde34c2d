"""The usual alternative to the processor: one asyncio.gather over all requests behind a Semaphore(10).

Written from a one-line description, as a typical user would: every request is a coroutine, a
semaphore keeps 10 in flight, a 429 (or a 5xx / dropped connection) is retried with exponential backoff
(1 s doubling, jittered to 50-150 %, at most 6 tries; the semaphore slot is held while backing off, as in
the common `async with sem: for attempt in ...` pattern), `retry-after` and the rate-limit headers are
ignored, and each result is appended to a JSONL file as [request, response] or [request, ["error", ...]].

    python benchmarks/semaphore_baseline.py --requests_filepath R.jsonl --save_filepath OUT.jsonl \\
        --request_url http://127.0.0.1:PORT/v1/messages

Prints one JSON line: {"requests", "succeeded", "failed", "rate_limited_seen", "seconds"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import aiohttp

CONCURRENCY = 10
MAX_TRIES = 6
BACKOFF_INITIAL_SECONDS = 1.0


async def run(bodies: list[dict], url: str, save_path: str, headers: dict[str, str]) -> dict:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    counts = {"succeeded": 0, "failed": 0, "rate_limited_seen": 0}
    started = time.monotonic()
    with open(save_path, "w", encoding="utf-8") as out:
        async with aiohttp.ClientSession() as session:

            async def one(body: dict) -> None:
                errors: list[str] = []
                async with semaphore:
                    for attempt in range(MAX_TRIES):
                        try:
                            async with session.post(url, json=body, headers=headers) as response:
                                payload = await response.read()
                                if response.status == 200:
                                    out.write(json.dumps([body, json.loads(payload)]) + "\n")
                                    counts["succeeded"] += 1
                                    return
                                errors.append(f"{response.status}: {payload[:200].decode(errors='replace')}")
                                if response.status == 429:
                                    counts["rate_limited_seen"] += 1
                                elif response.status < 500:
                                    break  # not retryable
                        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                            errors.append(repr(exc))
                        if attempt + 1 < MAX_TRIES:
                            await asyncio.sleep(BACKOFF_INITIAL_SECONDS * 2 ** attempt * random.uniform(0.5, 1.5))
                out.write(json.dumps([body, ["error", *errors]]) + "\n")
                counts["failed"] += 1

            await asyncio.gather(*(one(body) for body in bodies))
    return {"requests": len(bodies), **counts, "seconds": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests_filepath", required=True)
    parser.add_argument("--save_filepath", required=True)
    parser.add_argument("--request_url", required=True)
    args = parser.parse_args()
    with open(args.requests_filepath, encoding="utf-8") as file:
        bodies = [json.loads(line) for line in file if line.strip()]
    for body in bodies:
        body.pop("metadata", None)
    headers = {"x-api-key": os.environ.get("ANTHROPIC_API_KEY", "bench-key"), "anthropic-version": "2023-06-01"}
    result = asyncio.run(run(bodies, args.request_url, args.save_filepath, headers))
    print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

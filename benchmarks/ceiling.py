"""The ceiling for the overhead benchmark: the least a client can do to send a JSONL file of requests.

It POSTs each line's bytes as they are (so the file must hold plain Messages bodies, no `metadata`),
keeps exactly --concurrency requests in flight, reads each answer, and writes nothing: no parsing, no
rate limiting, no retries, no result file. Whatever the processor spends beyond this is its overhead.

    python benchmarks/ceiling.py --requests_filepath R.jsonl --request_url http://127.0.0.1:PORT/v1/messages \\
        --concurrency 64

--trust_env makes the session look up proxies and .netrc as the processor's session does, to measure
what that costs. Prints one JSON line: {"requests": N, "ok": N_200, "seconds": elapsed}. API key from ANTHROPIC_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import aiohttp


async def run(lines: list[bytes], url: str, concurrency: int, headers: dict[str, str], trust_env: bool) -> dict:
    position = 0
    ok = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal position, ok
        while position < len(lines):  # bounded: each pass consumes one line
            data = lines[position]
            position += 1
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
                ok += response.status == 200

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, trust_env=trust_env) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return {"requests": len(lines), "ok": ok, "seconds": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests_filepath", required=True)
    parser.add_argument("--request_url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--trust_env", action="store_true",
                        help="ClientSession(trust_env=True), as the processor does (proxy and netrc look-ups)")
    args = parser.parse_args()
    with open(args.requests_filepath, "rb") as file:
        lines = [line.rstrip(b"\n") for line in file if line.strip()]
    headers = {"x-api-key": os.environ.get("ANTHROPIC_API_KEY", "bench-key"), "anthropic-version": "2023-06-01",
               "content-type": "application/json"}
    result = asyncio.run(run(lines, args.request_url, args.concurrency, headers, args.trust_env))
    print(json.dumps(result))
    return 0 if result["ok"] == result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())

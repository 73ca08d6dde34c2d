"""How close are the processor's input-token estimates to the service's counts, and how fast are they?

    python benchmarks/estimation_accuracy.py

The "service" is the fake server's tokenizer (tests/fake_server.py: count_input_tokens), which is
deliberately unlike tiktoken. The estimator learns from 100 answers of a mixed workload (short, long,
image and tool requests), then estimates 500 new requests; we report the median and 90th-percentile
relative error, before and after learning, for each tokenizer the processor can use here: the byte
estimate (what an offline machine gets), and a real tiktoken Encoding when cl100k_base is cached.
Also: microseconds to estimate a typical 2 KB request.
"""

import base64
import json
import random
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import api_request_parallel_processor as app  # noqa: E402
from fake_server import count_input_tokens  # noqa: E402
from tiktoken_offline import prime_cl100k_cache  # noqa: E402

MODEL = "claude-sonnet-4-5"
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more can out who "
         "about up said what them its into than time only could new some these two may first then do any like "
         "my now over such our man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make "
         "world still own see men work long get here between both life being under never day same another know "
         "while last might us great old year off come since against go came right used take three tokenizer "
         "estimation concurrency throughput latency bucket").split()


def png(width: int, height: int) -> str:
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return base64.b64encode(header + struct.pack(">I", zlib.crc32(header[12:]) & 0xFFFFFFFF)).decode()


def prose(rng: random.Random, words: int) -> str:
    text = []
    for i in range(words):
        word = rng.choice(WORDS)
        text.append(word.capitalize() if i % 12 == 0 else word)
        if i % 12 == 11:
            text[-1] += rng.choice([".", ",", ";", "?"])
    return " ".join(text)


def make_request(rng: random.Random) -> dict:
    kind = rng.choice(["short", "long", "image", "tool"])
    if kind == "short":
        return {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": prose(rng, rng.randint(5, 40))}]}
    if kind == "long":
        return {"model": MODEL, "max_tokens": 500, "system": prose(rng, rng.randint(100, 400)),
                "messages": [{"role": "user", "content": prose(rng, rng.randint(300, 2500))},
                             {"role": "assistant", "content": prose(rng, rng.randint(20, 200))},
                             {"role": "user", "content": prose(rng, rng.randint(10, 60))}]}
    if kind == "image":
        size = (rng.randint(200, 3000), rng.randint(200, 3000))
        return {"model": MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png(*size)}},
            {"type": "text", "text": prose(rng, rng.randint(10, 80))}]}]}
    return {"model": MODEL, "max_tokens": 300,
            "tools": [{"name": f"tool_{i}", "description": prose(rng, rng.randint(10, 40)),
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                                         "days": {"type": "integer"}}}}
                      for i in range(rng.randint(1, 4))],
            "messages": [{"role": "user", "content": prose(rng, rng.randint(10, 100))},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "tool_0",
                                                            "input": {"city": "Paris", "days": 3}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                       "content": prose(rng, rng.randint(20, 200))}]}]}


def measure(count_text, name: str) -> dict:
    rng = random.Random(42)
    estimator = app.Estimator(count_text)
    before = []
    for _ in range(100):
        body = make_request(rng)
        estimate = estimator.estimate(body)
        actual = count_input_tokens(body)
        before.append(abs(estimate.total - actual) / actual)
        estimator.learn(MODEL, estimate, actual, 50)
    errors = []
    for _ in range(500):
        body = make_request(rng)
        estimate = estimator.estimate(body)
        actual = count_input_tokens(body)
        errors.append(abs(estimator.corrected(MODEL, estimate.text, estimate.fixed) - actual) / actual)
    errors.sort()
    return {"tokenizer": name, "raw median error": statistics.median(before),
            "learned correction": estimator.calibration(MODEL).correction,
            "median error after 100 answers": statistics.median(errors),
            "p90 error": errors[int(0.9 * len(errors))]}


def speed(count_text) -> float:
    """Microseconds per estimate of distinct ~2 KB requests (no text repeats, so nothing is remembered)."""
    rng = random.Random(7)
    bodies = [{"model": MODEL, "max_tokens": 300, "system": "You are a careful assistant.",
               "messages": [{"role": "user", "content": prose(rng, 360)}]} for _ in range(3000)]
    sizes = [len(json.dumps(body)) for body in bodies]
    assert 1800 <= statistics.median(sizes) <= 2600, statistics.median(sizes)
    started = time.perf_counter()
    for body in bodies:
        app.estimate_input_tokens(body, count_text)
    return (time.perf_counter() - started) / len(bodies) * 1e6


def main() -> None:
    tokenizers = [(app.count_tokens_by_bytes, "byte estimate (offline fallback)")]
    prime_cl100k_cache()
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base")
        tokenizers.append((lambda text: len(encoding.encode_ordinary(text)), "tiktoken cl100k_base, every text whole"))
        tokenizers.append((app.sampling_counter(encoding.encode_ordinary), "tiktoken cl100k_base, sampled (the processor's)"))
    except Exception as exc:  # no cached encoding and no network: measure what we have
        print(f"(tiktoken cl100k_base not available here: {type(exc).__name__}; measuring the fallback only)")
    print("| tokenizer | raw median error | learned correction | median error after 100 answers | p90 error | us per 2 KB request |")
    print("|---|---|---|---|---|---|")
    for count_text, name in tokenizers:
        row = measure(count_text, name)
        print(f"| {name} | {row['raw median error']:.1%} | {row['learned correction']:.3f} | "
              f"{row['median error after 100 answers']:.1%} | {row['p90 error']:.1%} | {speed(count_text):.1f} |")


if __name__ == "__main__":
    main()

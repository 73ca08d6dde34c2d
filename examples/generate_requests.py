"""Write the two example request files of the README.

    python examples/generate_requests.py

- examples/test_requests_to_parallel_process.jsonl: 10 small arithmetic questions, each with metadata.
- examples/test_caching_requests_to_parallel_process.jsonl: 10 questions about one long document that
  sits in a cached system block, so every request after the first reads it from the cache.

Both use the same shapes as the original cookbook's examples; edit MODEL to use another model.
"""

import json
import random
from pathlib import Path

MODEL = "claude-sonnet-4-5"
HERE = Path(__file__).resolve().parent


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} requests to {path}")


def arithmetic_requests(n_requests: int = 10) -> list[dict]:
    return [
        {
            "model": MODEL,
            "max_tokens": 1024,
            "temperature": 0,
            "messages": [{"role": "user", "content": f"How much is 8 * {x}? Return only the result.\n Result:"}],
            "metadata": {"row_id": x},
        }
        for x in range(n_requests)
    ]


def long_document(paragraphs: int = 60, seed: int = 7) -> str:
    """A made-up blog long enough to be cached (several thousand tokens), the same on every run."""
    rng = random.Random(seed)
    subjects = ["The garden", "Our small team", "The river town", "The night market", "An old bicycle",
                "The library", "A winter kitchen", "The harbour", "The mountain trail", "A second-hand bookshop"]
    verbs = ["taught us", "reminded everyone", "showed", "made it plain", "suggested", "proved once again"]
    ideas = ["that patience compounds like interest", "that small habits outlast grand plans",
             "that good tools disappear in the hand", "that neighbours are the first infrastructure",
             "that every map leaves something out", "that rest is part of the work",
             "that curiosity is cheaper than certainty", "that repair is a form of respect"]
    closings = ["We wrote it down so we would not forget.", "Nobody agreed at first.",
                "It took a whole season to notice.", "The lesson came back the next spring.",
                "Several readers wrote in with their own versions.", "It is still true today."]
    text = []
    for number in range(1, paragraphs + 1):
        sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(ideas)}." for _ in range(4)]
        text.append(f"Part {number}. " + " ".join(sentences) + " " + rng.choice(closings))
    return "\n\n".join(text)


def caching_requests() -> list[dict]:
    queries = [
        "Analyze the main themes of this blog.",
        "List the places the blog mentions.",
        "Which idea does the blog repeat most often?",
        "Summarize the blog in three sentences.",
        "What tone does the author use?",
        "Suggest a title for this blog.",
        "Which part would you cut, and why?",
        "Write a one-line teaser for social media.",
        "What question would you ask the author?",
        "Name three lessons a reader could apply this week.",
    ]
    system = [
        {"type": "text", "text": "You are an AI assistant tasked with analyzing blogs. Your goal is to provide "
                                 "insightful information and knowledge.\n"},
        {"type": "text", "text": long_document(), "cache_control": {"type": "ephemeral"}},
    ]
    return [
        {"model": MODEL, "max_tokens": 1024, "temperature": 0, "system": system,
         "messages": [{"role": "user", "content": query}], "metadata": {"query_id": index}}
        for index, query in enumerate(queries)
    ]


if __name__ == "__main__":
    write_jsonl(HERE / "test_requests_to_parallel_process.jsonl", arithmetic_requests())
    write_jsonl(HERE / "test_caching_requests_to_parallel_process.jsonl", caching_requests())

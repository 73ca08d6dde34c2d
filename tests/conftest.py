"""Shared fixtures: the repository root on sys.path, a fake Anthropic server, and a way to run the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SCRIPT = ROOT / "api_request_parallel_processor.py"
TEST_API_KEY = "sk-ant-test-7d3f9c1e-never-log-me"


def write_requests(path: Path, rows: list) -> Path:
    """Write request bodies (dicts, or raw strings for deliberately bad lines) as JSONL."""
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_results(path: Path) -> list:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def simple_request(index: int, text: str = "", model: str = "claude-sonnet-4-5", max_tokens: int = 100, **extra):
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Question {index}: how much is 8 * {index}? {text}"}],
            "metadata": {"row_id": index}}
    body.update(extra)
    return body


def run_cli(args: list, env_extra: dict | None = None, timeout: float = 120, cwd: Path | None = None,
            api_key: str | None = TEST_API_KEY) -> subprocess.CompletedProcess:
    """Run the processor as a user would, as a subprocess; returns the completed process."""
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    if api_key is not None:
        env["ANTHROPIC_API_KEY"] = api_key
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or ROOT)


@pytest.fixture
def requests_file(tmp_path):
    def make(rows, name="requests.jsonl"):
        return write_requests(tmp_path / name, rows)
    return make

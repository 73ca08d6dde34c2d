"""
API REQUEST PARALLEL PROCESSOR (Anthropic Messages API)

The problem: you have a file of thousands to millions of Claude requests and want every one of them
answered, as fast as your rate limits allow, at the lowest cost, without losing or duplicating a single
result. Sending them one by one is slow; firing them all at once earns a wall of 429s. This script sits
between the two: it keeps as many requests in flight as your limits allow, and no more.

Features
  - Streams the requests file line by line, so memory does not grow with the file.
  - Three token buckets per model (requests, input tokens, output tokens per minute), refilled
    continuously. A request is sent only when all three hold its need; each response's `usage` and
    rate-limit headers correct the buckets afterwards.
  - Reads the service's rate-limit headers: `auto` adopts the limits it advertises, and when another
    process uses the same limit, the buckets follow the service, leave the others their rate of use and
    claim only their share of what remains. The first request to each model goes alone (streamed, so
    its headers come back at once), and the full buckets are then handed out over two seconds rather
    than in one burst.
  - Token estimates start from tiktoken (or a byte-based fallback when its encoding cannot be loaded, as on
    an air-gapped machine) and learn a correction per model from the real `usage` of each answer.
  - Prompt caching: the first request of each cached prefix writes the cache alone, the others wait for it
    and then read it; cached tokens are not charged against the input-token limit.
  - Retries with exponential backoff and jitter for what the service says is transient (429, 5xx, 529,
    dropped connections, timeouts, malformed answers), honouring `retry-after`; fails a request at once
    for what will never succeed (400, 404, 413); stops the whole run for what no retry can fix (a rejected
    key, billing, permissions, the spend limit).
  - Exactly one result line per valid input line; a second run of the same command resumes where the
    first stopped, skipping answered requests. Ctrl-C stops gracefully.
  - Long answers are streamed (server-sent events), so the timeout measures silence, not length.
  - Optional: the Message Batches API at half price (`--batch`), a dry run with a cost estimate
    (`--dry_run`), a progress bar and a JSON summary.

Example command
  python api_request_parallel_processor.py \\
    --requests_filepath examples/test_requests_to_parallel_process.jsonl \\
    --save_filepath examples/data/test_requests_to_parallel_process_results.jsonl \\
    --request_url https://api.anthropic.com/v1/messages \\
    --max_requests_per_minute 40 --max_tokens_per_minute 16000 --max_attempts 5 --logging_level INFO

Inputs (flags keep the original cookbook's names, with underscores)
  --requests_filepath        the JSONL file of Messages API bodies; each may carry a `metadata` object that
                             belongs to this tool: it is removed before sending and written with the result.
  --save_filepath            where results are appended (default: the requests path with `.jsonl`
                             replaced by `_results.jsonl`). Running again resumes; `--overwrite` restarts.
  --request_url              default https://api.anthropic.com/v1/messages
  --api_key                  default: ANTHROPIC_API_KEY from the environment or a `.env` file
                             (the environment wins). Prefer those: a flag is visible to other users.
  --max_requests_per_minute  default 40; `auto` adopts 95% of what the service advertises.
  --max_tokens_per_minute    input tokens per minute, default 16000; `auto` as above.
  --max_output_tokens_per_minute   default 6400; `auto` as above.
      Advice: set each limit to your tier's limit for the model (Console, Settings, Limits). Limits are
      applied per model, as the service applies them. A number is a hard cap this tool never exceeds.
  --max_attempts             attempts per request before it is written as a failure, default 5
  --logging_level            TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL or 5..50, default INFO
  --use_caching              True/False (bare flag means True), default False: gate cached prefixes
  --max_concurrent_requests  optional cap on requests in flight
  --request_timeout          seconds per attempt (default 600, longer for large max_tokens)
  --stream                   auto (long answers only), always, never; default auto
  --stream_idle_timeout      seconds of silence that end a streamed attempt, default 120
  --anthropic_version, --anthropic_beta   headers to send
  --overwrite, --shutdown_grace, --progress/--no_progress, --summary_filepath, --dry_run,
  --batch, --batch_cancel    see --help

Output
  One JSON line per request, appended as each finishes (in completion order, not input order):
    [request, response, metadata]          on success (`request` is the body as read, without metadata)
    [request, ["error", ...], metadata]    when the request finally failed, one string per attempt
  The metadata element is left out when the input line had none.
  Exit status: 0 all succeeded, 1 some failed, 2 usage or input error before any request,
  3 run aborted by the service (key, billing, permission, spend limit), 130/143 stopped by a signal.

Outline of this file (sections in order, marked by banners)
  1. Constants               tunables, units in their names
  2. Errors                  ProcessorError and its two children
  3. Reading requests        parse and validate one line; read_jobs() generator
  4. Token estimation        count every block type; Estimator learns a correction per model
  5. Rate limiting           TokenBucket (pure), Limiter (three buckets + pause + headers)
  6. Classifying answers     classify() -> Success | Retry | Fail | Abort; backoff; retry-after
  7. Streaming               MessageAssembler rebuilds a Message from server-sent events
  8. Prices                  the price table and cost of a usage
  9. Results file            ResumeIndex (what is already done), ResultWriter (the only writer)
 10. HTTP                    send_attempt(): one attempt, every foreign error translated here
 11. Scheduler               the one loop: admits, sleeps until something can happen, settles
 12. Batch mode              the Message Batches API behind the same input and output
 13. Running a job           process_api_requests_from_file(), dry run, summary
 14. Command line            parse_args(), main(argv)

Design notes
  - Time passes only in `await`. When nothing can be sent, the scheduler computes the earliest moment a
    bucket will hold enough (or a retry falls due) and sleeps until then or until an answer arrives.
  - Every attempt is a task in one set owned by the scheduler; answers are settled in the loop, in one
    place, so no counter has to be kept in step by hand.
  - All time comes from one monotonic clock passed in, so the pure pieces are tested without sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import functools
import hashlib
import heapq
import json
import math
import os
import random
import re
import signal
import struct
import sys
import tempfile
import threading
import time
from array import array
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
from loguru import logger

# ======================================================================================================
# 1. Constants
# ======================================================================================================

DEFAULT_REQUEST_URL = "https://api.anthropic.com/v1/messages"
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
# The original cookbook's defaults: about 80% of an early Tier 1.
DEFAULT_MAX_REQUESTS_PER_MINUTE = 40
DEFAULT_MAX_INPUT_TOKENS_PER_MINUTE = 16_000
DEFAULT_MAX_OUTPUT_TOKENS_PER_MINUTE = 6_400
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_REQUEST_TIMEOUT_SECONDS = 600.0
DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS = 120.0
DEFAULT_SHUTDOWN_GRACE_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0

# API keys are long; a shorter "key" (a placeholder for a local test server) is not masked in output.
MIN_SECRET_LENGTH_TO_REDACT = 8

# The service answers 413 above this many bytes per Messages request.
MAX_REQUEST_BYTES = 32 * 1024 * 1024

# After a 429 without `retry-after`, pause the model this long (the original's cool-down).
RATE_LIMIT_PAUSE_SECONDS = 15.0
# Backoff for other retryable errors: 1 s doubling up to 60 s, each drawn from [50%, 100%] of that.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0

# The most time we expect between sending a request and the service counting it (connection set-up,
# upload): see TokenBucket.
ARRIVAL_ALLOWANCE_SECONDS = 0.5

# With `auto`, adopt this share of the limit the service advertises.
AUTO_LIMIT_SHARE = 0.95
# Follow the service's `remaining` header when it is lower than our books by more than this share of
# the limit (and the rounding of token counts): someone else is using it. Learn the others' rate of use
# at this rate, and halve the estimate after this long without a deficit.
HEADER_RESYNC_TOLERANCE = 0.005
# The headers give token counts rounded to the thousand (request counts exactly).
HEADER_TOKEN_ROUNDING = 1000.0
HEADER_OBSERVE_INTERVAL_SECONDS = 0.02
FOREIGN_USE_LEARNING_RATE = 0.3
FOREIGN_USE_DECAY_SECONDS = 10.0
# While others share a limit, leave this many seconds of its refill at the service (see shared_reserve),
# and keep at least this share of it for ourselves.
SHARED_RESERVE_SECONDS = 0.5
MIN_SHARE = 0.1
# Until a model's first answer arrives, send one request to it alone (streamed in `--stream auto`, so
# its headers come back before the answer is written), for at most this long: its rate-limit headers
# tell us whether someone else is already using the limit, before we send a full bucket's worth.
FIRST_CONTACT_PATIENCE_SECONDS = 5.0
# Then hand out the full buckets over this many seconds rather than at once (see TokenBucket.ramp_up).
RAMP_UP_SECONDS = 2.0

# Token estimation. tiktoken's cl100k_base undercounts Claude tokens; until a model's first answer
# calibrates it, we charge generously (the overcharge is refunded when each answer arrives, so it costs
# about one latency, while an undercharge would cost 429s).
UNCALIBRATED_INPUT_FACTOR = 2.0
TOKENIZE_EXACTLY_UP_TO_CHARS = 600  # longer texts are counted from three samples of this many characters:
TOKENIZE_SAMPLE_CHARS = 200
CORRECTION_FACTOR_BOUNDS = (0.5, 4.0)
CORRECTION_LEARNING_RATE = 0.1  # weight of each new answer once a few have arrived
OUTPUT_PRIOR_ANSWERS = 4  # max_tokens weighs as much as this many answers in the output estimate
OUTPUT_LEARNING_RATE = 0.05
OUTPUT_DEVIATION_MARGIN = 0.5  # reserve the mean output plus this many mean deviations
PER_MESSAGE_OVERHEAD_TOKENS = 4
PER_REQUEST_OVERHEAD_TOKENS = 8
IMAGE_MAX_LONG_EDGE_PIXELS = 1568
IMAGE_MAX_TOKENS = 1600  # an image given by URL or of unknown size
# With `tools`, the service adds its tool-use system prompt: 346 tokens (tool_choice auto or none) or
# 313 (any or tool) on current models, by the published table.
TOOL_USE_SYSTEM_PROMPT_TOKENS = {"auto": 346, "none": 346, "any": 313, "tool": 313}
PDF_TOKENS_PER_PAGE = 1500
PDF_UNKNOWN_PAGES = 10

# Streaming: the official SDK expects about 128,000 output tokens per hour and refuses a non-streaming
# request expected to run longer than 10 minutes; `--stream auto` streams above a third of that.
EXPECTED_OUTPUT_TOKENS_PER_HOUR = 128_000
AUTO_STREAM_ABOVE_SECONDS = 200.0

# How many parsed requests may wait in memory ahead of the dispatcher (bounds memory, not speed).
MAX_JOBS_READ_AHEAD = 256

# The minute log and the cache check.
PROGRESS_LOG_INTERVAL_SECONDS = 60.0
CACHING_CHECK_WARNING_PAUSE_SECONDS = 10.0

# Batch mode.
BATCH_MAX_REQUESTS = 100_000
BATCH_MAX_BYTES = 256 * 1024 * 1024
BATCH_POLL_INITIAL_SECONDS = 5.0
BATCH_POLL_MAX_SECONDS = 60.0

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

# ======================================================================================================
# 2. Errors
# ======================================================================================================
#
#   ProcessorError            anything this tool reports to the user instead of a traceback
#   ├── UsageError            bad flags or files, found before any request was sent (exit status 2)
#   └── RunAborted            the service refused the whole run: key, billing, permission (exit status 3)


class ProcessorError(Exception):
    """Base of the errors this tool reports as one line."""


class UsageError(ProcessorError):
    """A flag, the input file or the save path is unusable; nothing was sent."""


class RunAborted(ProcessorError):
    """The service answered that no request of this run can succeed."""


# ======================================================================================================
# 3. Reading requests
# ======================================================================================================

NO_METADATA = object()  # a line without a `metadata` key: its result line has two elements


@dataclass
class Job:
    """One valid input line on its way through the processor."""

    line_number: int
    body: dict  # the request as sent: the input object without the tool's `metadata`
    metadata: Any = NO_METADATA
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    estimate: InputEstimate | None = None
    _encoded: bytes | None = None

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def encoded(self) -> bytes:
        """The body as JSON, made once: sent with every attempt and written with the result."""
        if self._encoded is None:
            self._encoded = json.dumps(self.body, ensure_ascii=False).encode("utf-8")
        return self._encoded

    def success_line(self, success: Success) -> bytes:
        """The result line of an answer, reusing the bytes sent and received when they are one line."""
        if success.raw is None or b"\n" in success.raw or b"\r" in success.raw:
            return (json.dumps(self.result_line(success.message), ensure_ascii=False) + "\n").encode("utf-8")
        parts = [b"[", self.encoded, b", ", success.raw.strip()]
        if self.metadata is not NO_METADATA:
            parts += [b", ", json.dumps(self.metadata, ensure_ascii=False).encode("utf-8")]
        parts.append(b"]\n")
        return b"".join(parts)

    def result_line(self, response: Any) -> list:
        line = [self.body, response]
        if self.metadata is not NO_METADATA:
            line.append(self.metadata)
        return line


@dataclass
class InvalidLine:
    """An input line that cannot be sent; it becomes a failure line naming its number and reason."""

    line_number: int
    reason: str
    request: Any  # the parsed object when the line was JSON, else the raw text
    metadata: Any = NO_METADATA

    def result_line(self) -> list:
        line = [self.request, [f"line {self.line_number}: {self.reason}"]]
        if self.metadata is not NO_METADATA:
            line.append(self.metadata)
        return line


def parse_request_line(raw: bytes, line_number: int) -> Job | InvalidLine | None:
    """Turn one raw input line into a Job, an InvalidLine, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidLine(line_number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                           raw.decode("utf-8", errors="replace").strip())
    text = text.strip().lstrip("\ufeff")
    if not text:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return InvalidLine(line_number, f"not valid JSON ({exc.msg} at column {exc.colno})", text)
    if not isinstance(obj, dict):
        return InvalidLine(line_number, f"expected a JSON object, got {type(obj).__name__}", obj)
    metadata = obj.pop("metadata", NO_METADATA)
    problem = validate_request_body(obj)
    if problem is None and len(raw) > MAX_REQUEST_BYTES:
        size = len(json.dumps(obj, ensure_ascii=False).encode("utf-8"))
        if size > MAX_REQUEST_BYTES:
            problem = f"request is {size:,} bytes, over the service's limit of {MAX_REQUEST_BYTES:,}"
    if problem is not None:
        return InvalidLine(line_number, problem, obj, metadata)
    return Job(line_number=line_number, body=obj, metadata=metadata)


def validate_request_body(body: dict) -> str | None:
    """Return why the service would refuse this body outright, or None when it looks sendable."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        return "missing or invalid `model` (a non-empty string is required)"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return "missing or invalid `max_tokens` (a positive integer is required)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing or invalid `messages` (a non-empty list is required)"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages[{index}] needs a `role` of 'user' or 'assistant'"
        if not isinstance(message.get("content"), (str, list)):
            return f"messages[{index}] needs `content` as a string or a list of blocks"
    if "system" in body and not isinstance(body["system"], (str, list)):
        return "`system` must be a string or a list of text blocks"
    if "tools" in body and not isinstance(body["tools"], list):
        return "`tools` must be a list"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "`stream` must be true or false"
    return None


def read_jobs(path: Path) -> Iterator[Job | InvalidLine]:
    """Yield one Job or InvalidLine per non-blank line, reading only as far as the caller asks."""
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            parsed = parse_request_line(raw, line_number)
            if parsed is not None:
                yield parsed


def count_lines(path: Path) -> int:
    """Count newline-terminated lines (and a last unterminated one) quickly, for the progress bar."""
    count, last = 0, b"\n"
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


# ======================================================================================================
# 4. Token estimation
# ======================================================================================================


def load_tokenizer(timeout_seconds: float = 5.0) -> tuple[Callable[[str], int], str]:
    """Return (count_tokens, description): tiktoken cl100k_base when it loads, else a byte estimate.

    tiktoken downloads its encoding on first use and caches it (TIKTOKEN_CACHE_DIR is honoured by
    tiktoken itself). On an air-gapped machine the download fails, or may hang; we give it a few seconds
    in a helper thread and fall back, saying so once.
    """
    loaded: dict[str, Any] = {}

    def load() -> None:
        try:
            import tiktoken

            loaded["encoding"] = tiktoken.get_encoding("cl100k_base")
        except Exception as exc:  # any failure of an optional dependency means: use the fallback
            loaded["error"] = exc

    thread = threading.Thread(target=load, name="tiktoken-loader", daemon=True)
    thread.start()
    thread.join(timeout_seconds)
    encoding = loaded.get("encoding")
    if encoding is None:
        reason = loaded.get("error", f"no answer within {timeout_seconds:g} s")
        logger.warning(
            f"tiktoken's cl100k_base encoding could not be loaded ({type(reason).__name__ if isinstance(reason, Exception) else reason}); "
            "estimating tokens from byte counts instead. Estimates are corrected from each answer's usage, "
            "so this only makes the first seconds more cautious. To use tiktoken offline, copy its cache "
            "and set TIKTOKEN_CACHE_DIR."
        )
        return count_tokens_by_bytes, "byte estimate"
    return sampling_counter(encoding.encode_ordinary), "tiktoken cl100k_base"


def sampling_counter(encode: Callable[[str], list], exact_up_to_chars: int = TOKENIZE_EXACTLY_UP_TO_CHARS,
                     sample_chars: int = TOKENIZE_SAMPLE_CHARS) -> Callable[[str], int]:
    """Count tokens exactly for short texts; for long ones, tokenize three samples and scale up.

    BPE tokenizing costs about 40 microseconds per kilobyte on a slow core, which would make estimation
    the hottest spot of a fast run; sampling keeps a 2 KB request near 30 microseconds. The small bias of
    cutting words at the sample edges is absorbed by the correction learned from usage. Texts repeated
    across requests (a shared system prompt, a cached document) are counted once and remembered.
    """
    remembered: dict[str, int] = {}

    def count(text: str) -> int:
        length = len(text)
        if length <= exact_up_to_chars:
            return len(encode(text))
        known = remembered.get(text)
        if known is not None:
            return known
        middle = (length - sample_chars) // 2
        samples = (text[:sample_chars], text[middle:middle + sample_chars], text[-sample_chars:])
        tokens = round(sum(len(encode(sample)) for sample in samples) * length / (3 * sample_chars))
        if len(remembered) >= 1024:
            remembered.clear()
        remembered[text] = tokens
        return tokens

    return count


def count_tokens_by_bytes(text: str) -> int:
    """A fast tokenizer-free estimate: about 4 characters a token for ASCII text, 1 for other scripts."""
    characters = len(text)
    extra_bytes = len(text.encode("utf-8")) - characters
    return (characters + 3) // 4 + (extra_bytes + 1) // 2


@dataclass(frozen=True)
class InputEstimate:
    """Uncorrected input tokens of one request, and of its cacheable prefix.

    `text` is what our tokenizer counted (it differs from Claude's by a factor that we learn); `fixed` is
    what follows the service's own published rules (images by pixel count, PDF pages), left uncorrected.
    """

    text: int
    fixed: int = 0
    prefix_text: int = 0  # of those, the tokens up to and including the last block with cache_control
    prefix_fixed: int = 0
    prefix_key: str | None = None  # identifies that prefix (model + content), when one exists

    @property
    def total(self) -> int:
        return self.text + self.fixed

    @property
    def cached_prefix(self) -> int:
        return self.prefix_text + self.prefix_fixed


def image_tokens(source: Any) -> int:
    """Tokens of an image block: about width*height/750 after the service's downscaling."""
    if not isinstance(source, dict) or source.get("type") != "base64":
        return IMAGE_MAX_TOKENS
    size = image_size_from_base64(str(source.get("data", "")))
    if size is None:
        return IMAGE_MAX_TOKENS
    width, height = size
    scale = min(1.0, IMAGE_MAX_LONG_EDGE_PIXELS / max(width, height, 1))
    return max(1, min(IMAGE_MAX_TOKENS, math.ceil(width * scale * height * scale / 750)))


def image_size_from_base64(data: str) -> tuple[int, int] | None:
    """Read (width, height) from the header of a base64 PNG, GIF, WebP or JPEG, or None."""
    try:
        head = base64.b64decode(data[:65536 - 65536 % 4], validate=False)
    except (ValueError, TypeError):
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if head[:2] == b"\xff\xd8":
        return jpeg_size(head)
    return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk JPEG segments to the first start-of-frame marker and read its size."""
    offset = 2
    while offset + 9 < len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            offset += 2
            continue
        (length,) = struct.unpack(">H", data[offset + 2:offset + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
            return width, height
        offset += 2 + length
    return None


def pdf_tokens(source: Any, count_text: Callable[[str], int]) -> int:
    """Tokens of a document block: text documents are counted, PDFs estimated per page."""
    if not isinstance(source, dict):
        return PDF_TOKENS_PER_PAGE * PDF_UNKNOWN_PAGES
    kind = source.get("type")
    if kind == "text":
        return count_text(str(source.get("data", "")))
    if kind == "content":
        return sum(block_tokens(block, count_text) for block in source.get("content") or [])
    if kind == "base64":
        try:
            pdf = base64.b64decode(str(source.get("data", "")), validate=False)
        except (ValueError, TypeError):
            return PDF_TOKENS_PER_PAGE * PDF_UNKNOWN_PAGES
        pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
        return PDF_TOKENS_PER_PAGE * (pages or PDF_UNKNOWN_PAGES)
    return PDF_TOKENS_PER_PAGE * PDF_UNKNOWN_PAGES


def block_tokens(block: Any, count_text: Callable[[str], int]) -> int:
    """Tokens of one content block of any type the service bills as input."""
    if isinstance(block, str):
        return count_text(block)
    if not isinstance(block, dict):
        return count_text(json.dumps(block))
    kind = block.get("type")
    if kind == "text":
        return count_text(str(block.get("text", "")))
    if kind == "image":
        return image_tokens(block.get("source"))
    if kind == "document":
        return pdf_tokens(block.get("source"), count_text) + count_text(str(block.get("title") or ""))
    if kind == "tool_use":
        return 4 + count_text(str(block.get("name", ""))) + count_text(json.dumps(block.get("input", {})))
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return 4 + sum(block_tokens(part, count_text) for part in content)
        return 4 + count_text(str(content))
    if kind == "thinking":
        return count_text(str(block.get("thinking", "")))
    if kind == "redacted_thinking":
        return len(str(block.get("data", ""))) // 4
    # Unknown block types (search results, server tools...): count their JSON, minus nothing.
    return count_text(json.dumps(block))


def estimate_input_tokens(body: dict, count_text: Callable[[str], int],
                          track_cache_prefix: bool = False) -> InputEstimate:
    """Count the input tokens of a request body, in the service's order: tools, system, messages.

    With track_cache_prefix, also find the prefix that ends at the last block carrying cache_control:
    its token count, and a key (model + the prefix's content) shared by requests with the same prefix.
    """
    total, text = PER_REQUEST_OVERHEAD_TOKENS, PER_REQUEST_OVERHEAD_TOKENS
    prefix_total = prefix_text = 0
    prefix_key = None
    digest = hashlib.sha256(body["model"].encode()) if track_cache_prefix else None

    def count_and_note(part: str) -> int:
        nonlocal text
        tokens = count_text(part)
        text += tokens  # whatever is not counted here (images, PDF pages) is `fixed`
        return tokens

    def visit(piece: Any, tokens: int) -> None:
        nonlocal total, prefix_total, prefix_text, prefix_key
        total += tokens
        if digest is not None:
            digest.update(json.dumps(piece, sort_keys=True, separators=(",", ":")).encode())
            if isinstance(piece, dict) and piece.get("cache_control"):
                prefix_total, prefix_text, prefix_key = total, text, digest.hexdigest()[:24]

    count = count_and_note
    if body.get("tools"):
        choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
        total += TOOL_USE_SYSTEM_PROMPT_TOKENS.get(choice.get("type", "auto"), 346)

    for tool in body.get("tools") or []:
        described = {k: v for k, v in tool.items() if k != "cache_control"} if isinstance(tool, dict) else tool
        visit(tool, count(json.dumps(described)))
    system = body.get("system")
    if isinstance(system, str):
        visit(system, count(system))
    elif isinstance(system, list):
        for block in system:
            visit(block, block_tokens(block, count))
    for message in body.get("messages") or []:
        content = message.get("content")
        total += PER_MESSAGE_OVERHEAD_TOKENS
        text += PER_MESSAGE_OVERHEAD_TOKENS
        if digest is not None:
            digest.update(str(message.get("role")).encode())
        if isinstance(content, str):
            visit(content, count(content))
        else:
            for block in content or []:
                visit(block, block_tokens(block, count))
    return InputEstimate(text=text, fixed=total - text, prefix_text=prefix_text,
                         prefix_fixed=prefix_total - prefix_text, prefix_key=prefix_key)


@dataclass
class ModelCalibration:
    """What the answers of one model have taught us about its token counts."""

    answers: int = 0
    log_correction: float = 0.0  # running mean of log(actual input / estimated input)
    log_spread: float = 0.0  # running mean of |log error| of the corrected estimate
    output_tokens_mean: float = 0.0
    output_tokens_deviation: float = 0.0  # running mean of |output - mean|

    @property
    def correction(self) -> float:
        low, high = CORRECTION_FACTOR_BOUNDS
        return min(high, max(low, math.exp(self.log_correction)))


class Estimator:
    """Turns a request into the tokens to charge, and learns from every answer.

    Input: the tokenizer's count times a per-model correction learned from `usage` (actual input + cache
    writes + cache reads, less the image and PDF tokens that follow published rules, against our count of
    the text), plus those image and PDF tokens. Output: max_tokens until
    the model's first answers arrive, then the running mean of the output tokens seen (never above the
    request's own max_tokens). Before the first answer the input estimate is doubled: an overcharge is
    refunded when the answer arrives, an undercharge would earn 429s.
    """

    def __init__(self, count_text: Callable[[str], int]):
        self.count_text = count_text
        self.models: dict[str, ModelCalibration] = {}

    def estimate(self, body: dict, track_cache_prefix: bool = False) -> InputEstimate:
        return estimate_input_tokens(body, self.count_text, track_cache_prefix)

    def calibration(self, model: str) -> ModelCalibration:
        return self.models.setdefault(model, ModelCalibration())

    def corrected(self, model: str, text_tokens: int, fixed_tokens: int = 0) -> int:
        """The best estimate of the tokens the service will count for a prompt we counted so."""
        calibration = self.calibration(model)
        if calibration.answers == 0:
            return math.ceil((text_tokens + fixed_tokens) * UNCALIBRATED_INPUT_FACTOR)
        return math.ceil(text_tokens * calibration.correction) + fixed_tokens

    def input_charge(self, model: str, text_tokens: int, fixed_tokens: int = 0) -> int:
        """Tokens to take from the input bucket at dispatch: the estimate plus a margin for its error."""
        calibration = self.calibration(model)
        margin = 1.0 if calibration.answers == 0 else 1.0 + min(0.5, 0.02 + 1.5 * calibration.log_spread)
        return math.ceil(self.corrected(model, text_tokens, fixed_tokens) * margin)

    def output_charge(self, model: str, max_tokens: int) -> int:
        """Output tokens to reserve at dispatch: max_tokens at first, then what answers have taught us.

        A generous estimate (the mean plus half the mean deviation) costs little, as the reservation is
        corrected when each answer arrives; a stingy one, applied to a whole burst, would overrun the
        limit. The first answers to arrive are the short ones, so max_tokens keeps some weight until a
        few dozen have come back.
        """
        calibration = self.calibration(model)
        learned = calibration.output_tokens_mean + OUTPUT_DEVIATION_MARGIN * calibration.output_tokens_deviation
        prior_weight = OUTPUT_PRIOR_ANSWERS / (OUTPUT_PRIOR_ANSWERS + calibration.answers)
        expected = prior_weight * max_tokens + (1 - prior_weight) * learned
        return max(1, min(max_tokens, math.ceil(expected)))

    def learn(self, model: str, estimate: InputEstimate, actual_input: int, actual_output: int) -> None:
        """Fold one answer's usage (all input tokens, cached or not, and output) into the calibration."""
        calibration = self.calibration(model)
        calibration.answers += 1
        weight = max(CORRECTION_LEARNING_RATE, 1.0 / calibration.answers)
        actual_text = actual_input - estimate.fixed
        if estimate.text > 0 and actual_text > 0:
            observed = math.log(actual_text / estimate.text)
            if calibration.answers > 1:
                predicted = estimate.text * calibration.correction + estimate.fixed
                error = abs(math.log(actual_input / predicted))
                calibration.log_spread += weight * (error - calibration.log_spread)
            calibration.log_correction += weight * (observed - calibration.log_correction)
        # Output lengths vary more than prompt counts: average them over more answers.
        output_weight = max(OUTPUT_LEARNING_RATE, 1.0 / calibration.answers)
        deviation = abs(actual_output - calibration.output_tokens_mean) if calibration.answers > 1 else 0.0
        calibration.output_tokens_deviation += output_weight * (deviation - calibration.output_tokens_deviation)
        calibration.output_tokens_mean += output_weight * (actual_output - calibration.output_tokens_mean)


# ======================================================================================================
# 5. Rate limiting
# ======================================================================================================


class TokenBucket:
    """A bucket of `capacity` units refilled continuously at `refill_per_second`. Pure: time is passed in.

    The level may go negative when an answer shows we charged too little; it then refills from below.

    `arrival_allowance_seconds`: we charge a request when it leaves, the service when it arrives. If the
    service's bucket is full meanwhile, the refill of those moments is lost to it but not to us, and our
    books would run ahead of the service's for the rest of the run (by 0.05 s of refill, say, from the
    first connection's set-up). So a take from a nearly full bucket also removes what the service may lose.
    """

    def __init__(self, capacity: float, refill_per_second: float, now: float, level: float | None = None,
                 arrival_allowance_seconds: float = 0.0):
        self.capacity = capacity
        self.refill_per_second = refill_per_second
        self.arrival_allowance_seconds = arrival_allowance_seconds
        self._level = capacity if level is None else level
        self._updated = now
        self._ramp_per_second = 0.0  # see ramp_up()
        self._ramp_until = now

    def level(self, now: float) -> float:
        if now > self._updated:
            gained = (now - self._updated) * self.refill_per_second
            if self._ramp_until > self._updated:
                gained += (min(now, self._ramp_until) - self._updated) * self._ramp_per_second
            self._level = min(self.capacity, self._level + gained)
            self._updated = now
        return self._level

    def ramp_up(self, seconds: float, now: float) -> None:
        """Hand out the full bucket over `seconds` instead of at once: the same total by then, but no
        sudden burst (the service throttles steep ramps, and others sharing the limit get time to show
        up in its headers before we have spent it all)."""
        self.level(now)
        self._level -= self.capacity
        self._ramp_per_second = self.capacity / seconds
        self._ramp_until = now + seconds

    def take(self, amount: float, now: float) -> None:
        level = self.level(now)
        lost_at_the_service = max(0.0, level + self.refill_per_second * self.arrival_allowance_seconds - self.capacity)
        self._level = level - amount - lost_at_the_service

    def give_back(self, amount: float, now: float) -> None:
        self._level = min(self.capacity, self.level(now) + amount)

    def available(self, now: float) -> float:
        """The level plus what a ramp-up has yet to hand out (the bucket never holds more than its
        capacity): what our books say we may still spend of the service's bucket."""
        return min(self.capacity, self.level(now) + max(0.0, self._ramp_until - now) * self._ramp_per_second)

    def lower_to(self, level: float, now: float, over_seconds: float = 0.0) -> None:
        """The service holds less than our books: believe it. With `over_seconds`, hand out what we then
        hold over that long (as a ramp-up) rather than at once: others spend from it too, and their use
        shows up in the headers only as our answers come back."""
        if self.available(now) <= level:
            return
        base = min(self.level(now), 0.0, level)  # debts stay; only what is there to spend is spread
        self._level = base
        over_seconds = max(over_seconds, self._ramp_until - now)  # a ramp-up in progress stays one
        if over_seconds > 0 and level > base:
            self._ramp_per_second = (level - base) / over_seconds
            self._ramp_until = now + over_seconds
        else:
            self._level = level
            self._ramp_until = now

    def seconds_until(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds `amount` (a need above capacity waits for a full bucket)."""
        missing = min(amount, self.capacity) - self.level(now)
        if missing <= 0:
            return 0.0
        ramp_seconds = max(0.0, self._ramp_until - now)
        ramped = ramp_seconds * (self.refill_per_second + self._ramp_per_second)
        if missing <= ramped:
            return missing / (self.refill_per_second + self._ramp_per_second)
        if self.refill_per_second <= 0:
            return math.inf
        return ramp_seconds + (missing - ramped) / self.refill_per_second

    def set_refill(self, per_second: float, now: float) -> None:
        """Change only the refill rate (the capacity stays), from `now` on."""
        self.level(now)
        self.refill_per_second = per_second

    @property
    def full_rate(self) -> float:
        """The limit per second: the refill when nobody else shares the limit."""
        return self.capacity / 60.0

    def set_rate(self, per_minute: float, now: float) -> None:
        """Change the limit; the level keeps its value, so a higher limit ramps up instead of bursting."""
        self._level = min(self.level(now), per_minute)
        self.capacity = per_minute
        self.refill_per_second = per_minute / 60.0


@dataclass(frozen=True)
class Need:
    """What one attempt takes from a model's buckets."""

    requests: int
    input_tokens: int
    output_tokens: int


LIMIT_KINDS = ("requests", "input-tokens", "output-tokens")


@dataclass
class LimitSetting:
    """A per-minute limit: a number the tool never exceeds, or `auto` (learn it from the service)."""

    per_minute: float
    auto: bool = False


class Limiter:
    """The three buckets of one model, plus a pause after a 429, plus what the service's headers say."""

    def __init__(self, settings: dict[str, LimitSetting], now: float):
        self.settings = settings
        self.buckets = {kind: TokenBucket(s.per_minute, s.per_minute / 60.0, now,
                                          arrival_allowance_seconds=ARRIVAL_ALLOWANCE_SECONDS)
                        for kind, s in settings.items()}
        self.paused_until = 0.0
        self.advertised: dict[str, float] = {}
        # What others sharing the service's limit seem to use, per second: see observe_headers.
        self.foreign_per_second = dict.fromkeys(LIMIT_KINDS, 0.0)
        # When the service's headers last lowered a bucket. None until the first header: what that one
        # finds missing may be what an earlier run of ours used just before, so it teaches us no rate.
        self.last_resync: dict[str, float | None] = dict.fromkeys(LIMIT_KINDS, None)
        # All we have charged to each bucket, and how much of it by the last resync: our own rate of use
        # between two readings of the headers, to weigh against the others' (see observe_headers).
        self.taken_total = dict.fromkeys(LIMIT_KINDS, 0.0)
        self.taken_at_resync = dict.fromkeys(LIMIT_KINDS, 0.0)
        self.headers_seen_at = -math.inf

    def seconds_until_admissible(self, need: Need, now: float) -> float:
        waits = [self.paused_until - now,
                 self.buckets["requests"].seconds_until(need.requests, now),
                 self.buckets["input-tokens"].seconds_until(need.input_tokens, now),
                 self.buckets["output-tokens"].seconds_until(need.output_tokens, now)]
        return max(0.0, *waits)

    def take(self, need: Need, now: float) -> None:
        """Charge an attempt when it leaves."""
        for kind, amount in zip(LIMIT_KINDS, (need.requests, need.input_tokens, need.output_tokens)):
            self.buckets[kind].take(amount, now)
            self.taken_total[kind] += amount

    def settle(self, kind: str, charged: float, actual: float, now: float) -> None:
        """Correct a bucket once the real amount is known."""
        difference = actual - charged
        self.taken_total[kind] += difference
        if difference > 0:
            self.buckets[kind].take(difference, now)
        elif difference < 0:
            self.buckets[kind].give_back(-difference, now)

    def ramp_up(self, now: float) -> None:
        """Our first contact with this model answered: spread the full buckets over the next seconds."""
        for bucket in self.buckets.values():
            bucket.ramp_up(RAMP_UP_SECONDS, now)

    def pause(self, until: float, now: float | None = None) -> None:
        """Send nothing to this model until `until` (a 429's retry-after).

        With `now`, the buckets also gain nothing during the pause: what refills meanwhile at the service
        went to whoever made it answer 429, and spending it all when the pause ends would only earn the
        next 429 (two processes sharing a limit would otherwise fall into a rhythm of bursts and pauses).
        """
        self.paused_until = max(self.paused_until, until)
        if now is not None:
            for bucket in self.buckets.values():
                # To just what makes it reach zero when the pause ends (several 429s do not add up).
                bucket.lower_to(-(until - now) * bucket.refill_per_second, now)

    def observe_headers(self, headers: Any, now: float) -> list[str]:
        """Read `anthropic-ratelimit-*`: adopt `auto` limits, and follow the service when it has less.

        Our books charge every request when it leaves and the service charges it when it arrives, so our
        level is normally at or below the service's `remaining`. When the service reports clearly less,
        someone else shares the limit (another process, another machine). Then:
        - from the deficits over time we estimate the others' rate of use, and leave it to them by
          refilling that much slower (the estimate decays when the deficits stop);
        - of what remains at the service we claim only our share (our use against theirs since the last
          reading), handed out over a few seconds, since they read the same `remaining` and spend from
          it too, and what they spend meanwhile reaches us only with our next answers;
        - we leave a small reserve at the service (see shared_reserve).
        We never raise a bucket from a header. Returns notices about the advertised limits, for the
        caller to log once.
        """
        notices = []
        for kind in LIMIT_KINDS:
            limit = parse_number(headers.get(f"anthropic-ratelimit-{kind}-limit"))
            remaining = parse_number(headers.get(f"anthropic-ratelimit-{kind}-remaining"))
            setting, bucket = self.settings[kind], self.buckets[kind]
            if limit is not None and limit > 0:
                first_time = kind not in self.advertised
                self.advertised[kind] = limit
                if setting.auto:
                    target = limit * AUTO_LIMIT_SHARE
                    if abs(target - bucket.capacity) > 1e-9:
                        bucket.set_rate(target, now)
                        self.apply_foreign_use(kind, now)
                elif first_time and limit >= 2 * setting.per_minute:
                    notices.append(f"the service allows {limit:,.0f} {kind.replace('-', ' ')}/min for this model; "
                                   f"you set {setting.per_minute:,.0f}; pass auto to use it")
            if remaining is None:
                continue
            # A difference within the rounding (and a small share of the limit) is noise.
            tolerance = 1.0 if kind == "requests" else header_rounding(kind) + HEADER_RESYNC_TOLERANCE * bucket.capacity
            available = bucket.available(now)
            last = self.last_resync[kind]
            if last is None:  # the first header: follow it, learn nothing yet
                self.mark_resync(kind, now)
                if available - remaining > tolerance:
                    bucket.lower_to(remaining, now, over_seconds=RAMP_UP_SECONDS)
                continue
            since = now - last
            reserve = self.shared_reserve(kind)
            # What we leave the others is theirs: spending into it is a deficit, too. Except near a full
            # bucket, where our books run below the service's by the arrival allowance (see TokenBucket)
            # and nobody is short of anything.
            near_full = remaining + reserve + ARRIVAL_ALLOWANCE_SECONDS * bucket.full_rate >= bucket.capacity
            deficit = available - (remaining if near_full else remaining - reserve)
            if deficit > tolerance:
                # Since the last resync we already left them foreign_per_second; the deficit is the rest.
                others = self.foreign_per_second[kind] + deficit / max(since, 0.1)
                own = max(0.0, self.taken_total[kind] - self.taken_at_resync[kind]) / max(since, 0.1)
                self.learn_others_use(kind, others, now)
                # The others read the same `remaining` and will spend from it too: claim only our share
                # of it, as we and they used the limit since the last reading, and hand it out over a
                # few seconds. (Claiming all of it at once, two processes that start together each spend
                # the whole bucket, and a third of their requests meet a 429.)
                # (The raw reading, not the smoothed estimate: it is the same window as our own use. At
                # least a tenth, as apply_foreign_use leaves us at least a tenth of the refill. Refunds
                # can make our own use negative.) The reserve is asked again: it begins with this lesson.
                share = max(MIN_SHARE, own / (own + others))
                bucket.lower_to(share * (remaining - self.shared_reserve(kind)), now, over_seconds=RAMP_UP_SECONDS)
            elif available - (remaining - reserve) > tolerance:
                # Nothing new about the others, but we have come to hold part of what we leave them.
                bucket.lower_to(remaining - reserve, now)
            elif self.foreign_per_second[kind] and (since > FOREIGN_USE_DECAY_SECONDS or (
                    remaining - reserve - available > tolerance and since > 1.0)):
                # No deficit for a long while, or the service holds clearly more than we thought: the
                # others use less now. Halve our estimate of them (a deficit will correct it if wrong),
                # and forget them once it is a trifle.
                self.foreign_per_second[kind] /= 2
                if self.foreign_per_second[kind] < MIN_SHARE / 10 * bucket.full_rate:
                    self.foreign_per_second[kind] = 0.0
                self.mark_resync(kind, now)
                self.apply_foreign_use(kind, now)
        return notices

    def learn_from_rate_limit(self, headers: Any, need: Need, now: float) -> None:
        """A 429: our books said the service held what this request needed, and it did not. Where its
        headers show a bucket short of the need, someone else spent it (or the service's limit is below
        ours): count that as the others' use, as a deficit would be. Near an empty bucket this is often
        the only sign of them, since `remaining` cannot go below zero."""
        for kind, amount in zip(LIMIT_KINDS, (need.requests, need.input_tokens, need.output_tokens)):
            remaining = parse_number(headers.get(f"anthropic-ratelimit-{kind}-remaining"))
            last = self.last_resync[kind]
            # Only an empty bucket or a shortfall beyond the headers' rounding counts.
            if remaining is None or last is None or (remaining > 0 and remaining + header_rounding(kind) >= amount):
                continue
            if now - last < 1.0:
                continue  # several 429s of one moment are one sign, not several
            self.learn_others_use(kind, self.foreign_per_second[kind] + (amount - remaining) / (now - last), now)

    def learn_others_use(self, kind: str, per_second: float, now: float) -> None:
        """Fold one reading of the others' rate of use into our estimate, and leave it to them."""
        previous = self.foreign_per_second[kind]
        estimate = previous + FOREIGN_USE_LEARNING_RATE * (per_second - previous)
        # They cannot use more than the whole limit (our own pauses after 429s can make it look so).
        self.foreign_per_second[kind] = min(estimate, self.buckets[kind].full_rate)
        self.mark_resync(kind, now)
        self.apply_foreign_use(kind, now)

    def shared_reserve(self, kind: str) -> float:
        """While others share a limit, what we leave at the service: when two clients each spend every
        unit the moment it refills, whichever comes second meets a 429. A little left in hand absorbs
        that race."""
        if not self.foreign_per_second[kind]:
            return 0.0
        # A reserve within the headers' rounding would be unseen.
        return SHARED_RESERVE_SECONDS * self.buckets[kind].full_rate + header_rounding(kind)

    def mark_resync(self, kind: str, now: float) -> None:
        self.last_resync[kind] = now
        self.taken_at_resync[kind] = self.taken_total[kind]

    def apply_foreign_use(self, kind: str, now: float) -> None:
        """Refill at our limit less what others seem to use (never below a tenth of our limit)."""
        bucket = self.buckets[kind]
        bucket.set_refill(max(MIN_SHARE * bucket.full_rate, bucket.full_rate - self.foreign_per_second[kind]), now)


def header_rounding(kind: str) -> float:
    return 0.0 if kind == "requests" else HEADER_TOKEN_ROUNDING


def parse_number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ======================================================================================================
# 6. Classifying answers
# ======================================================================================================


@dataclass(frozen=True)
class Success:
    message: dict
    raw: bytes | None = None  # the answer exactly as received, when it can be written as it is


@dataclass(frozen=True)
class Retry:
    reason: str
    after_seconds: float | None = None  # from retry-after; None means use backoff
    rate_limited: bool = False
    kind: str = "other"  # for the summary: rate_limit, overloaded, server_error, connection, timeout, ...


@dataclass(frozen=True)
class Fail:
    reason: str
    kind: str = "invalid_request"


@dataclass(frozen=True)
class Abort:
    reason: str


Outcome = Success | Retry | Fail | Abort

ABORT_ADVICE = {
    401: "API key rejected (401 {type}): check ANTHROPIC_API_KEY",
    402: "billing problem (402 {type}): check the billing settings of your account",
    403: "permission denied (403 {type}): this key may not use this model or endpoint",
}


def parse_retry_after(headers: Any, now_wall: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `retry-after` as seconds or as an HTTP date."""
    value = headers.get("retry-after-ms")
    if value is not None:
        seconds = parse_number(value)
        if seconds is not None and seconds >= 0:
            return seconds / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = parse_number(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment is None:
        return None
    return max(0.0, moment.timestamp() - (time.time() if now_wall is None else now_wall))


def error_of(payload: Any) -> tuple[str, str]:
    """(type, message) of an API error body, tolerating anything."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        return str(error.get("type", "unknown_error")), str(error.get("message", ""))
    return "unknown_error", ""


def is_spend_limit(payload: Any) -> bool:
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return False
    details = payload["error"].get("details")
    return isinstance(details, dict) and details.get("error_code") == "enforced_spend_limit_reached"


def is_valid_message(payload: Any) -> bool:
    return (isinstance(payload, dict) and payload.get("type") == "message"
            and isinstance(payload.get("content"), list) and isinstance(payload.get("usage"), dict))


def classify(status: int, headers: Any, body: bytes) -> Outcome:
    """Decide what one HTTP answer means. The one place that knows the service's error semantics."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        payload = None
    if status == 200:
        if is_valid_message(payload):
            return Success(payload, body)
        # A 200 that is not a complete Message (truncated, or missing fields) was not a real answer.
        return Retry(f"200 with a body that is not a valid Message: {snippet(body)}", kind="malformed")

    error_type, message = error_of(payload)
    described = f"{status} {error_type}: {message}" if payload is not None else f"{status}: {snippet(body)}"
    # The account itself is refused: every request would fail the same way, so stop the run.
    if status in ABORT_ADVICE:
        return Abort(ABORT_ADVICE[status].format(type=error_type) + (f" ({message})" if message else ""))
    # The monthly spend cap: a 429 that no waiting will lift.
    if status == 429 and is_spend_limit(payload) and headers.get("retry-after") is None:
        return Abort(f"spend limit reached (429 enforced_spend_limit_reached): {message or 'raise the limit in the Console'}")
    retry_after = parse_retry_after(headers)
    # The service may say outright whether to retry.
    should_retry = str(headers.get("x-should-retry", "")).lower()
    if should_retry == "true":
        return Retry(described, retry_after, rate_limited=status == 429, kind=error_kind(status))
    if should_retry == "false":
        return Fail(described, kind=error_kind(status))
    # Rate limited: wait as told (the scheduler pauses the whole model).
    if status == 429:
        return Retry(described, retry_after, rate_limited=True, kind="rate_limit")
    # Timeouts, lock conflicts, overload and server errors are transient.
    if status in (408, 409) or status >= 500:
        return Retry(described, retry_after, kind=error_kind(status))
    # 400, 404, 413 and other client errors: the same request will be refused again.
    return Fail(described, kind=error_kind(status))


def error_kind(status: int) -> str:
    return {429: "rate_limit", 529: "overloaded", 408: "timeout", 409: "conflict", 400: "invalid_request",
            404: "not_found", 413: "too_large"}.get(status, "server_error" if status >= 500 else f"http_{status}")


def snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    text = re.sub(r"\s+", " ", text)
    return text[:limit] + ("..." if len(text) > limit else "") if text else "(empty body)"


def backoff_seconds(attempt: int, rng: random.Random) -> float:
    """Delay before retry number `attempt` (1-based): 1, 2, 4, ... capped at 60 s, times [0.5, 1)."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2.0 ** min(attempt - 1, 64))
    return ceiling * (0.5 + 0.5 * rng.random())


# ======================================================================================================
# 7. Streaming
# ======================================================================================================


class StreamError(Exception):
    """An `error` event inside a stream that began with HTTP 200."""

    def __init__(self, payload: dict):
        self.payload = payload
        super().__init__(json.dumps(payload))


class MessageAssembler:
    """Rebuilds the Message that the non-streaming API would have returned, from server-sent events."""

    def __init__(self) -> None:
        self.message: dict | None = None
        self.partial_json: dict[int, str] = {}
        self.finished = False

    def feed(self, event: str, data: str) -> None:
        if event == "ping" or not data:
            return
        payload = json.loads(data)
        kind = payload.get("type", event)
        if kind == "error":
            raise StreamError(payload)
        if kind == "message_start":
            self.message = payload["message"]
            self.message.setdefault("content", [])
            return
        if self.message is None:
            raise ValueError(f"stream event {kind!r} before message_start")
        content = self.message["content"]
        if kind == "content_block_start":
            block = payload["content_block"]
            index = payload.get("index", len(content))
            while len(content) <= index:
                content.append(None)
            content[index] = block
            if block.get("type") in ("tool_use", "server_tool_use"):
                self.partial_json[index] = ""
        elif kind == "content_block_delta":
            index, delta = payload["index"], payload["delta"]
            block = content[index]
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                block["text"] = block.get("text", "") + delta["text"]
            elif delta_type == "input_json_delta":
                self.partial_json[index] = self.partial_json.get(index, "") + delta.get("partial_json", "")
            elif delta_type == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
            elif delta_type == "signature_delta":
                block["signature"] = block.get("signature", "") + delta["signature"]
            elif delta_type == "citations_delta":
                block.setdefault("citations", []).append(delta["citation"])
        elif kind == "content_block_stop":
            index = payload["index"]
            if index in self.partial_json:
                text = self.partial_json.pop(index)
                content[index]["input"] = json.loads(text) if text else {}
        elif kind == "message_delta":
            self.message.update(payload.get("delta") or {})
            usage = payload.get("usage") or {}
            # message_delta usage is cumulative; take every field it gives.
            self.message.setdefault("usage", {}).update({k: v for k, v in usage.items() if v is not None})
        elif kind == "message_stop":
            self.finished = True

    def result(self) -> dict:
        if self.message is None or not self.finished:
            raise ValueError("stream ended before message_stop")
        return self.message


def should_stream(body: dict, mode: str) -> bool:
    """`always`, `never`, or in `auto` when the answer could take longer than a few minutes."""
    if body.get("stream") is True or mode == "always":
        return True
    if mode == "never":
        return False
    expected_seconds = 3600.0 * body["max_tokens"] / EXPECTED_OUTPUT_TOKENS_PER_HOUR
    return expected_seconds > AUTO_STREAM_ABOVE_SECONDS


def non_streaming_timeout(max_tokens: int, configured: float | None) -> float:
    """The user's --request_timeout, or by default 600 s growing with how long max_tokens may take."""
    if configured is not None:
        return configured
    return max(DEFAULT_REQUEST_TIMEOUT_SECONDS, 1.5 * 3600.0 * max_tokens / EXPECTED_OUTPUT_TOKENS_PER_HOUR)


# ======================================================================================================
# 8. Prices
# ======================================================================================================

# USD per million tokens: input, 5-minute cache write, 1-hour cache write, cache read, output.
# Checked 2026-11 against the published pricing; update here when it changes. Batch: half of each.
PRICES_CHECKED = "2026-11"
PRICES_PER_MILLION: dict[str, tuple[float, float, float, float, float]] = {
    "claude-opus-4-7": (5.0, 6.25, 10.0, 0.50, 25.0),
    "claude-opus-4-6": (5.0, 6.25, 10.0, 0.50, 25.0),
    "claude-opus-4-5": (5.0, 6.25, 10.0, 0.50, 25.0),
    "claude-opus-4-1": (15.0, 18.75, 30.0, 1.50, 75.0),
    "claude-opus-4": (15.0, 18.75, 30.0, 1.50, 75.0),
    "claude-sonnet-4-6": (3.0, 3.75, 6.0, 0.30, 15.0),
    "claude-sonnet-4-5": (3.0, 3.75, 6.0, 0.30, 15.0),
    "claude-sonnet-4": (3.0, 3.75, 6.0, 0.30, 15.0),
    "claude-3-7-sonnet": (3.0, 3.75, 6.0, 0.30, 15.0),
    "claude-haiku-4-5": (1.0, 1.25, 2.0, 0.10, 5.0),
    "claude-3-5-haiku": (0.80, 1.0, 1.6, 0.08, 4.0),
    "claude-3-haiku": (0.25, 0.30, 0.50, 0.03, 1.25),
}


def model_class(model: str) -> str:
    """The family a model id belongs to: `claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`."""
    return re.sub(r"-(\d{8}|latest)$", "", model)


@functools.lru_cache(maxsize=256)
def prices_for(model: str) -> tuple[float, float, float, float, float] | None:
    """The price row of a model, matching the longest known family name; None when unknown."""
    family = model_class(model)
    for name in sorted(PRICES_PER_MILLION, key=len, reverse=True):
        if family == name or family.startswith(name + "-"):
            return PRICES_PER_MILLION[name]
    return None


def usage_cost(model: str, usage: dict, batch: bool = False) -> tuple[float, float] | None:
    """(cost, what caching saved) in USD for one answer's usage, or None for an unknown model."""
    prices = prices_for(model)
    if prices is None:
        return None
    input_price, write_5m, write_1h, read_price, output_price = prices
    cache_creation = usage.get("cache_creation") or {}
    written = int(usage.get("cache_creation_input_tokens") or 0)
    written_1h = int(cache_creation.get("ephemeral_1h_input_tokens") or 0)
    written_5m = written - written_1h
    read = int(usage.get("cache_read_input_tokens") or 0)
    cost = (int(usage.get("input_tokens") or 0) * input_price + written_5m * write_5m + written_1h * write_1h
            + read * read_price + int(usage.get("output_tokens") or 0) * output_price) / 1e6
    uncached = (written + read) * input_price / 1e6
    saved = uncached - (written_5m * write_5m + written_1h * write_1h + read * read_price) / 1e6
    factor = 0.5 if batch else 1.0
    return cost * factor, saved * factor


# ======================================================================================================
# 9. Results file
# ======================================================================================================


def request_fingerprint(request: Any, metadata: Any) -> int:
    """A 64-bit fingerprint of a request and its metadata, for matching results to input lines."""
    canonical = json.dumps([request, None if metadata is NO_METADATA else metadata, metadata is NO_METADATA],
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "little")


class ResumeIndex:
    """The fingerprints of requests already answered: 9 bytes each (sorted 64-bit array + used flags).

    Identical requests appearing several times count as several: each success line matches one input.
    """

    def __init__(self, fingerprints: array):
        self._sorted = array("Q", sorted(fingerprints))
        self._used = bytearray(len(self._sorted))

    def __len__(self) -> int:
        return len(self._sorted)

    def claim(self, fingerprint: int) -> bool:
        """True (and mark it used) when an unused success line exists for this request."""
        index = bisect_left(self._sorted, fingerprint)
        while index < len(self._sorted) and self._sorted[index] == fingerprint:
            if not self._used[index]:
                self._used[index] = 1
                return True
            index += 1
        return False


def parse_save_line(raw: bytes) -> tuple[int, bool] | None:
    """(request fingerprint, succeeded) of one line of a save file, or None if it is not a result."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, list) or len(record) not in (2, 3):
        return None
    metadata = record[2] if len(record) == 3 else NO_METADATA
    return request_fingerprint(record[0], metadata), is_success_record(record)


def iter_save_file(path: Path, start: int = 0) -> Iterator[tuple[int, int, bool]]:
    """(byte offset, request fingerprint, succeeded) of each complete result line from `start` on."""
    if not path.exists():
        return
    with open(path, "rb") as file:
        file.seek(start)
        offset = start
        for raw in file:
            if not raw.endswith(b"\n"):
                return  # a torn last line: see scan_save_file
            parsed = parse_save_line(raw)
            if parsed is None:
                logger.warning(f"{path}: skipping an unreadable line at byte {offset}")
            else:
                yield offset, *parsed
            offset += len(raw)


@dataclass
class SaveFileScan:
    """What an existing save file holds."""

    successes: array  # fingerprints of success lines
    failure_lines: int
    valid_bytes: int  # bytes up to the end of the last complete line
    torn_bytes: int  # a partial last line left by a killed process


def scan_save_file(path: Path) -> SaveFileScan:
    """Read an existing save file once, line by line, without keeping the lines."""
    successes, failures, valid, torn = array("Q"), 0, 0, 0
    if path.exists():
        with open(path, "rb") as file:
            for raw in file:
                if not raw.endswith(b"\n"):
                    torn = len(raw)
                    break
                parsed = parse_save_line(raw)
                if parsed is None:
                    logger.warning(f"{path}: skipping an unreadable line at byte {valid}")
                elif parsed[1]:
                    successes.append(parsed[0])
                else:
                    failures += 1
                valid += len(raw)
    return SaveFileScan(successes, failures, valid, torn)


def compact_save_file(save_path: Path, requests_path: Path) -> int:
    """After a complete run, keep exactly one line per input request: every success line, and for a
    request with no success, only its latest failure line. Lines of requests that are no longer in the
    input are kept (nothing paid for is ever deleted). Returns how many lines were dropped.

    Memory grows with the number of failure lines only: the save file is read twice and the input once.
    """
    failures: dict[int, list[int]] = {}  # fingerprint -> offsets of its failure lines, oldest first
    for offset, fingerprint, succeeded in iter_save_file(save_path):
        if not succeeded:
            failures.setdefault(fingerprint, []).append(offset)
    if not failures:
        return 0
    answered: Counter = Counter(fingerprint for _, fingerprint, succeeded in iter_save_file(save_path)
                                if succeeded and fingerprint in failures)
    needed: Counter = Counter()
    for item in read_jobs(requests_path):
        fingerprint = request_fingerprint(item.body if isinstance(item, Job) else item.request, item.metadata)
        if fingerprint in failures:
            needed[fingerprint] += 1
    drop: set[int] = set()
    for fingerprint, offsets in failures.items():
        if needed[fingerprint] == 0:
            continue  # not in the input any more: keep it
        keep = max(0, needed[fingerprint] - answered[fingerprint])
        drop.update(offsets[:len(offsets) - keep])  # keep the latest failures
    if not drop:
        return 0
    return atomic_rewrite(save_path, lambda line, offset: offset not in drop)


def is_success_record(record: list) -> bool:
    return isinstance(record[1], dict) and record[1].get("type") == "message"


def atomic_rewrite(path: Path, keep: Callable[[bytes, int], bool]) -> int:
    """Rewrite `path` keeping the lines for which keep(line, byte offset) is true: temporary file, fsync,
    rename, so a crash at any moment leaves either the old file or the new one. Returns lines dropped."""
    dropped = 0
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as output, open(path, "rb") as source:
            offset = 0
            for raw in source:
                if keep(raw, offset):
                    output.write(raw)
                else:
                    dropped += 1
                offset += len(raw)
            output.flush()
            os.fsync(output.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return dropped


class ResultWriter:
    """The only code that writes the save file: one open file, one complete line per result, flushed.

    Each line is written with a single write() and flushed before the next, so a killed process leaves at
    most one torn last line, which the next run's scan drops.
    """

    FSYNC_INTERVAL_SECONDS = 1.0

    def __init__(self, path: Path, redact: Callable[[str], str], secret: str | None = None):
        self.path = path
        self.redact = redact
        self.secret = secret.encode("utf-8") if secret and len(secret) >= MIN_SECRET_LENGTH_TO_REDACT else None
        self._file = open(path, "ab")
        self._last_fsync = time.monotonic()

    def write(self, record: list) -> None:
        self.write_line((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def write_line(self, line: bytes) -> None:
        """Write one complete line (ending in a newline) and flush it."""
        if self.secret is not None and self.secret in line:
            line = self.redact(line.decode("utf-8")).encode("utf-8")
        self._file.write(line)
        self._file.flush()
        now = time.monotonic()
        if now - self._last_fsync >= self.FSYNC_INTERVAL_SECONDS:
            os.fsync(self._file.fileno())
            self._last_fsync = now

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            with contextlib.suppress(OSError):
                os.fsync(self._file.fileno())
            self._file.close()


# ======================================================================================================
# 10. HTTP
# ======================================================================================================

# What an `error` event inside a stream would have been as an HTTP status, to classify it the same way.
STREAM_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                       "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                       "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


@dataclass
class Transport:
    """Everything needed to send one attempt: the session, where, the headers, and the timeouts."""

    session: aiohttp.ClientSession
    url: str
    headers: dict[str, str]
    stream_mode: str = "auto"
    request_timeout_seconds: float | None = None  # None: 600 s, growing with max_tokens
    stream_idle_timeout_seconds: float = DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS
    proxy: str | None = None


def proxy_for(url: str) -> str | None:
    """The proxy the environment (HTTPS_PROXY, NO_PROXY...) sets for this URL, looked up once per run.

    aiohttp's trust_env would look it up (and .netrc) in a worker thread for every request, which costs
    a third of the throughput and, under load, floods the loop's wake-up pipe so that Ctrl-C is lost.
    """
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    if not parts.hostname or proxy_bypass(parts.hostname):
        return None
    return getproxies().get(parts.scheme)


def build_headers(api_key: str, anthropic_version: str, anthropic_beta: str | None) -> dict[str, str]:
    headers = {"x-api-key": api_key, "anthropic-version": anthropic_version, "content-type": "application/json"}
    if anthropic_beta:
        headers["anthropic-beta"] = ",".join(part.strip() for part in anthropic_beta.split(",") if part.strip())
    return headers


async def send_attempt(transport: Transport, body: dict, on_stream_start: Callable[[Any], None] | None = None,
                       prefer_stream: bool = False, encoded: bytes | None = None) -> tuple[Outcome, Any]:
    """Send one attempt and classify its answer: (outcome, response headers to read, or None).

    A stream's headers arrive before its answer: they go to `on_stream_start` at once (and None is
    returned in their place). `prefer_stream` streams this attempt in `--stream auto` even if short.
    This is the boundary where aiohttp's exceptions become outcomes: "no answer came back" (connection
    errors, timeouts, broken streams) is a Retry; "the server answered" goes through classify().
    """
    streaming = should_stream(body, transport.stream_mode) or (prefer_stream and transport.stream_mode == "auto")
    if streaming and body.get("stream") is not True:
        data = json.dumps(dict(body, stream=True), ensure_ascii=False).encode("utf-8")
    else:
        data = encoded if encoded is not None else json.dumps(body, ensure_ascii=False).encode("utf-8")
    if streaming:
        # For a stream the clock measures silence between events, not the length of the answer (and
        # no silence may outlast an explicit --request_timeout either).
        idle = transport.stream_idle_timeout_seconds
        if transport.request_timeout_seconds is not None:
            idle = min(idle, transport.request_timeout_seconds)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=idle)
        limit_text = f"no event for {idle:g} s"
    else:
        seconds = non_streaming_timeout(body["max_tokens"], transport.request_timeout_seconds)
        timeout = aiohttp.ClientTimeout(total=seconds, sock_connect=CONNECT_TIMEOUT_SECONDS)
        limit_text = f"no answer within {seconds:g} s"
    headers = None
    try:
        async with transport.session.post(transport.url, data=data, headers=transport.headers,
                                          timeout=timeout, proxy=transport.proxy) as response:
            headers = response.headers
            content_type = response.headers.get("content-type", "")
            if streaming and response.status == 200 and content_type.startswith("text/event-stream"):
                if on_stream_start is not None:
                    on_stream_start(headers)
                    headers = None
                return await read_event_stream(response), headers
            return classify(response.status, headers, await response.read()), headers
    except (asyncio.TimeoutError, TimeoutError):
        return Retry(f"timeout: {limit_text}", kind="timeout"), headers
    except aiohttp.ClientError as exc:
        return Retry(f"connection error: {type(exc).__name__}: {exc}", kind="connection"), headers


async def read_event_stream(response: aiohttp.ClientResponse) -> Outcome:
    """Read server-sent events into a Message; an `error` event is classified like its HTTP twin."""
    assembler = MessageAssembler()
    event, data_lines = "message", []
    try:
        async for raw in response.content:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line:
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data_lines.append(value)
                continue
            assembler.feed(event, "\n".join(data_lines))
            event, data_lines = "message", []
            if assembler.finished:
                break
        if data_lines:
            assembler.feed(event, "\n".join(data_lines))
        message = assembler.result()
    except StreamError as exc:
        error_type, _ = error_of(exc.payload)
        status = STREAM_ERROR_STATUS.get(error_type, 500)
        outcome = classify(status, {}, json.dumps(exc.payload).encode())
        return dataclasses.replace(outcome, reason=f"in stream: {outcome.reason}") if not isinstance(outcome, Success) else outcome
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return Retry(f"broken stream: {type(exc).__name__}: {exc}", kind="stream_broken")
    if not is_valid_message(message):
        return Retry("stream did not rebuild a valid Message", kind="stream_broken")
    return Success(message)


# ======================================================================================================
# 11. Scheduler
# ======================================================================================================


@dataclass
class Stats:
    """Counters that the progress bar, the minute log and the final summary read."""

    total_lines: int | None = None
    succeeded: int = 0
    failed: int = 0
    invalid_lines: int = 0
    skipped: int = 0
    attempts: int = 0
    rate_limited: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    cache_writes: int = 0
    cache_reads: int = 0
    cost_usd: float = 0.0
    cache_saved_usd: float = 0.0
    unpriced_models: set = field(default_factory=set)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.skipped

    def add_usage(self, model: str, usage: dict, batch: bool = False) -> None:
        self.input_tokens += int(usage.get("input_tokens") or 0)
        self.output_tokens += int(usage.get("output_tokens") or 0)
        written = int(usage.get("cache_creation_input_tokens") or 0)
        read = int(usage.get("cache_read_input_tokens") or 0)
        self.cache_write_tokens += written
        self.cache_read_tokens += read
        self.cache_writes += written > 0
        self.cache_reads += read > 0
        cost = usage_cost(model, usage, batch)
        if cost is None:
            self.unpriced_models.add(model)
        else:
            self.cost_usd += cost[0]
            self.cache_saved_usd += cost[1]


@dataclass
class Attempt:
    """One attempt in flight: what it charged, so its answer can settle the buckets."""

    job: Job
    limiter_key: str
    need: Need
    cache_writer: bool


class PrefixState:
    """Where a cached prefix stands: being written by one request, readable, or not cached at all."""

    WRITING, WARM, UNCACHEABLE = "writing", "warm", "uncacheable"


@dataclass
class SchedulerSettings:
    limits: dict[str, LimitSetting]
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_in_flight: int = 5000
    use_caching: bool = False
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS
    backoff_scale: float = 1.0  # tests shrink the backoff (not retry-after) with APPP_BACKOFF_SCALE


class Scheduler:
    """The only loop. It admits the next ready request when its model's limiter allows; otherwise it
    sleeps until the earliest of: a bucket holding enough, a retry falling due, an answer arriving.

    Jobs wait in one queue per model (retries go to the front), held jobs wait for their cache prefix,
    backed-off retries wait in a heap by due time. The run ends when the input is exhausted and all of
    these, and the set of attempts in flight, are empty.
    """

    def __init__(self, jobs: Iterator[Job | InvalidLine], settings: SchedulerSettings, send: Callable,
                 writer: ResultWriter, estimator: Estimator, stats: Stats,
                 resume_index: ResumeIndex | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, on_progress: Callable[[], None] | None = None):
        self.jobs = jobs
        self.settings = settings
        self.send = send
        self.writer = writer
        self.estimator = estimator
        self.stats = stats
        self.resume_index = resume_index
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_progress = on_progress or (lambda: None)

        self.limiters: dict[str, Limiter] = {}
        self.ready: dict[str, deque[Job]] = {}
        self.delayed: list[tuple[float, int, Job]] = []
        self.held: dict[str, list[Job]] = {}
        self.prefix_state: dict[str, str] = {}
        self.in_flight: dict[asyncio.Task, Attempt] = {}
        self.finished_tasks: deque[asyncio.Task] = deque()
        self.wake = asyncio.Event()
        self.input_exhausted = False
        self.sequence = 0
        self.dispatch_paused_until = 0.0  # after a failed cache check, give the user time to stop
        self.caching_probe: Job | None = None
        self.caching_checked = not settings.use_caching
        self.stop_reason: str | None = None  # a signal asked us to stop
        self.abort_reason: str | None = None  # the service refused the run
        self.next_progress_log = clock() + PROGRESS_LOG_INTERVAL_SECONDS
        self.notices_given: set[str] = set()
        self.first_contact_sent: dict[str, float] = {}  # model -> when its first request left
        self.contacted: set[str] = set()  # models that have answered at least once

    # ----- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not (self.stop_reason or self.abort_reason):
                # Clear before looking, so that news arriving after this point wakes the sleep below.
                self.wake.clear()
                self.settle_finished()
                if self.stop_reason or self.abort_reason:
                    break
                now = self.clock()
                self.release_due_retries(now)
                launched = self.launch_what_fits(now)
                if self.is_finished():
                    break
                if launched:
                    await asyncio.sleep(0)  # let the new attempts start before looking again
                    continue
                await self.sleep(self.seconds_until_next_event(now))
        finally:
            await self.drain()

    def request_stop(self, reason: str) -> None:
        """Called on SIGINT/SIGTERM: send nothing more; attempts in flight may finish within the grace."""
        self.stop_reason = self.stop_reason or reason
        self.wake.set()

    def is_finished(self) -> bool:
        return (self.input_exhausted and not self.in_flight and not self.delayed and not self.finished_tasks
                and not any(self.ready.values()) and not any(self.held.values()))

    async def sleep(self, seconds: float | None) -> None:
        """Sleep until `wake` is set (cleared by the caller before it looked at the state) or the time."""
        if self.finished_tasks:
            return
        if seconds is None:
            await self.wake.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            # A millisecond more, so we wake after the bucket is full enough, not a hair before.
            await asyncio.wait_for(self.wake.wait(), seconds + 0.001)

    def seconds_until_next_event(self, now: float) -> float | None:
        """The earliest moment something can be done without an answer arriving; None: wait for one."""
        moments = [self.next_progress_log]
        if self.delayed:
            moments.append(self.delayed[0][0])
        if self.dispatch_paused_until > now:
            moments.append(self.dispatch_paused_until)
        elif self.can_launch_more():
            for key, queue in self.ready.items():
                if not queue:
                    continue
                if self.awaiting_first_contact(key, now):
                    moments.append(self.first_contact_sent[key] + FIRST_CONTACT_PATIENCE_SECONDS)
                else:
                    moments.append(now + self.limiters[key].seconds_until_admissible(self.need_of(queue[0]), now))
        return max(0.0, min(moments) - now)

    def can_launch_more(self) -> bool:
        if len(self.in_flight) >= self.settings.max_in_flight:
            return False
        # While the cache check is out, nothing else goes.
        return not any(attempt.job is self.caching_probe for attempt in self.in_flight.values()) \
            if self.caching_probe is not None else True

    # ----- admission ----------------------------------------------------------------------------------

    def launch_what_fits(self, now: float) -> int:
        if now >= self.next_progress_log:
            self.log_progress()
            self.next_progress_log = now + PROGRESS_LOG_INTERVAL_SECONDS
        if now < self.dispatch_paused_until:
            return 0
        launched = 0
        while self.can_launch_more():
            picked = self.pick_admissible(now)
            if picked is None:
                break
            self.launch(*picked, now)
            launched += 1
            if not self.caching_checked:
                self.caching_probe = picked[0]
            if launched >= 256:
                break  # yield to the event loop now and then, even when everything fits
        return launched

    def pick_admissible(self, now: float) -> tuple[Job, str, Need] | None:
        """The first queue head that its limiter admits now, reading more input while every head waits."""
        while True:
            for key, queue in self.ready.items():
                while queue:
                    job = queue[0]
                    if self.is_held_for_cache(job):
                        self.held.setdefault(job.estimate.prefix_key, []).append(queue.popleft())
                        continue
                    if self.caching_probe is not None and job is not self.caching_probe:
                        break  # only the cache check's own retry may go until it is answered
                    if self.awaiting_first_contact(key, now):
                        break
                    need = self.need_of(job)
                    if self.limiters[key].seconds_until_admissible(need, now) <= 0:
                        return queue.popleft(), key, need
                    break
            if self.caching_probe is not None or not self.read_one_job():
                return None

    def read_one_job(self) -> bool:
        """Read input until one job is queued; False when the input is done or enough is read ahead."""
        if self.input_exhausted or self.jobs_waiting() >= MAX_JOBS_READ_AHEAD:
            return False
        for item in self.jobs:
            if isinstance(item, InvalidLine):
                logger.error(f"line {item.line_number}: {item.reason}; written as a failure, not sent")
                self.writer.write(item.result_line())
                self.stats.invalid_lines += 1
                self.stats.failed += 1
                self.on_progress()
                continue
            if self.resume_index is not None and self.resume_index.claim(
                    request_fingerprint(item.body, item.metadata)):
                self.stats.skipped += 1
                self.on_progress()
                continue
            self.enqueue(item)
            return True
        self.input_exhausted = True
        return False

    def awaiting_first_contact(self, key: str, now: float) -> bool:
        """True while this model's first request is out and has not answered (for a few seconds at most)."""
        if key in self.contacted or key not in self.first_contact_sent:
            return False
        return now < self.first_contact_sent[key] + FIRST_CONTACT_PATIENCE_SECONDS

    def jobs_waiting(self) -> int:
        return sum(len(queue) for queue in self.ready.values()) + sum(len(h) for h in self.held.values())

    def enqueue(self, job: Job, front: bool = False) -> None:
        if job.estimate is None:
            job.estimate = self.estimator.estimate(job.body, track_cache_prefix=self.settings.use_caching)
        key = model_class(job.model)
        if key not in self.limiters:
            self.limiters[key] = Limiter(self.settings.limits, self.clock())
            self.ready[key] = deque()
        (self.ready[key].appendleft if front else self.ready[key].append)(job)

    def is_held_for_cache(self, job: Job) -> bool:
        prefix = job.estimate.prefix_key
        return (self.settings.use_caching and prefix is not None
                and self.prefix_state.get(prefix) == PrefixState.WRITING)

    def need_of(self, job: Job) -> Need:
        estimate, model = job.estimate, job.model
        text, fixed = estimate.text, estimate.fixed
        if estimate.prefix_key and self.prefix_state.get(estimate.prefix_key) == PrefixState.WARM:
            # Cache reads do not count toward the input limit.
            text, fixed = text - estimate.prefix_text, fixed - estimate.prefix_fixed
        return Need(1, self.estimator.input_charge(model, text, fixed),
                    self.estimator.output_charge(model, job.body["max_tokens"]))

    def launch(self, job: Job, key: str, need: Need, now: float) -> None:
        limiter = self.limiters[key]
        limiter.take(need, now)
        prefix = job.estimate.prefix_key
        cache_writer = bool(self.settings.use_caching and prefix
                            and self.prefix_state.get(prefix) not in (PrefixState.WARM, PrefixState.UNCACHEABLE))
        if cache_writer:
            self.prefix_state[prefix] = PrefixState.WRITING
        job.attempts += 1
        self.stats.attempts += 1
        first_contact = key not in self.contacted and key not in self.first_contact_sent
        if first_contact:
            self.first_contact_sent[key] = now
        # The first contact is streamed: a stream's headers come back as soon as the service admits it,
        # not when the answer is done.
        early_headers = first_contact
        logger.trace("line {}: attempt {} sent, charged {}", job.line_number, job.attempts, need)
        task = asyncio.create_task(self.attempt(job, key, early_headers))
        self.in_flight[task] = Attempt(job, key, need, cache_writer)
        task.add_done_callback(self.on_task_done)

    async def attempt(self, job: Job, key: str, early_headers: bool) -> tuple[Outcome, Any]:
        # The one guard around each request: a bug of ours becomes a retry with the line number logged,
        # never a lost request or a dead run.
        try:
            return await self.send(job.body, on_stream_start=lambda headers: self.on_stream_start(key, headers),
                                   prefer_stream=early_headers, encoded=job.encoded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).error(f"line {job.line_number}: internal error while sending: {exc!r}")
            return Retry(f"internal error: {type(exc).__name__}: {exc}", kind="internal"), None

    def on_stream_start(self, key: str, headers: Any) -> None:
        """A stream began: its rate-limit headers are news before its answer is complete."""
        self.make_contact(key)
        self.observe_headers(self.limiters[key], headers)
        self.wake.set()

    def make_contact(self, key: str) -> None:
        """The model answered for the first time: from now on its buckets are spent, ramping up."""
        if key not in self.contacted:
            self.contacted.add(key)
            self.limiters[key].ramp_up(self.clock())

    def observe_headers(self, limiter: Limiter, headers: Any) -> None:
        now = self.clock()
        if now - limiter.headers_seen_at < HEADER_OBSERVE_INTERVAL_SECONDS:
            return  # at thousands of answers a second, a few readings a second tell us as much
        limiter.headers_seen_at = now
        for notice in limiter.observe_headers(headers, now):
            if notice not in self.notices_given:
                self.notices_given.add(notice)
                logger.info(notice)

    def on_task_done(self, task: asyncio.Task) -> None:
        self.finished_tasks.append(task)
        self.wake.set()

    # ----- answers ------------------------------------------------------------------------------------

    def settle_finished(self) -> None:
        while self.finished_tasks:
            task = self.finished_tasks.popleft()
            attempt = self.in_flight.pop(task)
            if task.cancelled():
                continue
            outcome, headers = task.result()
            self.settle(attempt, outcome, headers)

    def settle(self, attempt: Attempt, outcome: Outcome, headers: Any) -> None:
        job, now = attempt.job, self.clock()
        limiter = self.limiters[attempt.limiter_key]
        if isinstance(outcome, Success):
            self.settle_success(attempt, outcome, limiter, now)
        elif isinstance(outcome, Retry):
            self.settle_retry(attempt, outcome, limiter, now)
            if outcome.rate_limited and headers is not None:
                limiter.learn_from_rate_limit(headers, attempt.need, now)
        elif isinstance(outcome, Fail):
            self.stats.errors_by_kind[outcome.kind] += 1
            job.errors.append(outcome.reason)
            self.finish_failed(attempt)
        else:
            self.abort_reason = outcome.reason
        self.make_contact(attempt.limiter_key)
        if headers is not None:
            # After our own correction, so that the service's word is the last.
            self.observe_headers(limiter, headers)
        if job is self.caching_probe and (isinstance(outcome, (Success, Fail)) or job.attempts >= self.settings.max_attempts):
            self.report_caching_check(job, outcome, now)

    def settle_success(self, attempt: Attempt, success: Success, limiter: Limiter, now: float) -> None:
        job, need = attempt.job, attempt.need
        usage = success.message["usage"]
        written = int(usage.get("cache_creation_input_tokens") or 0)
        read = int(usage.get("cache_read_input_tokens") or 0)
        counted_input = int(usage.get("input_tokens") or 0) + written
        output = int(usage.get("output_tokens") or 0)
        limiter.settle("input-tokens", need.input_tokens, counted_input, now)
        limiter.settle("output-tokens", need.output_tokens, output, now)
        self.estimator.learn(job.model, job.estimate, counted_input + read, output)
        self.update_prefix(attempt, written, read)
        self.stats.add_usage(job.model, usage)
        self.writer.write_line(job.success_line(success))
        self.stats.succeeded += 1
        logger.debug("line {}: answered after {} attempt(s); input {}, cache read {}, output {}",
                     job.line_number, job.attempts, counted_input, read, output)
        self.on_progress()

    def settle_retry(self, attempt: Attempt, retry: Retry, limiter: Limiter, now: float) -> None:
        job = attempt.job
        self.stats.errors_by_kind[retry.kind] += 1
        job.errors.append(retry.reason)
        if retry.kind not in ("timeout", "connection", "stream_broken"):
            # The service refused it before producing anything: no output tokens were counted.
            limiter.settle("output-tokens", attempt.need.output_tokens, 0, now)
        delay = retry.after_seconds
        if retry.rate_limited:
            # A 429 was not admitted, so it cost nothing: refund it (the headers then set the level).
            limiter.settle("input-tokens", attempt.need.input_tokens, 0, now)
            limiter.settle("requests", attempt.need.requests, 0, now)
            self.stats.rate_limited += 1
            pause = RATE_LIMIT_PAUSE_SECONDS if delay is None else delay
            limiter.pause(now + pause, now)
            delay = pause
            logger.warning(f"line {job.line_number}: rate limited (429); pausing {attempt.limiter_key} for {pause:g} s")
        else:
            logger.warning(f"line {job.line_number}: attempt {job.attempts} failed, will retry: {retry.reason}")
        if self.stop_reason or self.abort_reason:
            return  # left unwritten: a later run resumes it
        if job.attempts >= self.settings.max_attempts:
            self.finish_failed(attempt)
            return
        if delay is None:
            delay = backoff_seconds(job.attempts, self.rng) * self.settings.backoff_scale
        self.sequence += 1
        heapq.heappush(self.delayed, (now + delay, self.sequence, job))

    def finish_failed(self, attempt: Attempt) -> None:
        job = attempt.job
        logger.error(f"line {job.line_number}: failed after {job.attempts} attempt(s): {job.errors[-1]}")
        self.writer.write(job.result_line(job.errors))
        self.stats.failed += 1
        if attempt.cache_writer:
            self.prefix_state.pop(job.estimate.prefix_key, None)  # let the next request write it
            self.release_held(job.estimate.prefix_key)
        self.on_progress()

    def update_prefix(self, attempt: Attempt, written: int, read: int) -> None:
        prefix = attempt.job.estimate.prefix_key
        if not (self.settings.use_caching and prefix):
            return
        state = self.prefix_state.get(prefix)
        if attempt.cache_writer:
            # Written (or already there): readable from now on. Neither: below the model's minimum.
            self.prefix_state[prefix] = PrefixState.WARM if (written or read) else PrefixState.UNCACHEABLE
            self.release_held(prefix)
        elif state == PrefixState.WARM and written and not read:
            # The entry had expired: the next request writes it alone again.
            self.prefix_state.pop(prefix, None)

    def release_held(self, prefix: str) -> None:
        for job in reversed(self.held.pop(prefix, [])):
            self.enqueue(job, front=True)

    def release_due_retries(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _, _, job = heapq.heappop(self.delayed)
            logger.debug("line {}: retrying (attempt {})", job.line_number, job.attempts + 1)
            self.enqueue(job, front=True)

    def report_caching_check(self, job: Job, outcome: Outcome, now: float) -> None:
        """The first request of a --use_caching run went alone: say whether the cache was used."""
        self.caching_probe = None
        self.caching_checked = True
        usage = outcome.message["usage"] if isinstance(outcome, Success) else {}
        if (usage.get("cache_creation_input_tokens") or 0) > 0 or (usage.get("cache_read_input_tokens") or 0) > 0:
            logger.success("Caching is enabled and working.")
            return
        if not isinstance(outcome, Success):
            cause = "the first request did not succeed"
        elif job.estimate.prefix_key is None:
            cause = "no block of the first request carries cache_control"
        else:
            cause = ("the cached prefix is probably shorter than the model's minimum cacheable length "
                     "(1,024 to 4,096 tokens, depending on the model)")
        logger.warning(f"Caching is not working: {cause}. Going on without it in "
                       f"{CACHING_CHECK_WARNING_PAUSE_SECONDS:g} s; press Ctrl-C to stop.")
        self.dispatch_paused_until = now + CACHING_CHECK_WARNING_PAUSE_SECONDS

    def log_progress(self) -> None:
        s = self.stats
        total = f" of {s.total_lines:,} lines" if s.total_lines else ""
        logger.info(f"progress: {s.done:,}{total} done ({s.succeeded:,} succeeded, {s.failed:,} failed, "
                    f"{s.skipped:,} skipped), {len(self.in_flight)} in flight, {s.rate_limited} rate limited")

    # ----- the end ------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Finish what is in flight: all of it normally, within the grace after a stop, none after an abort."""
        if self.in_flight and self.stop_reason and not self.abort_reason:
            logger.warning(f"{self.stop_reason}: sending nothing more; waiting up to "
                           f"{self.settings.shutdown_grace_seconds:g} s for {len(self.in_flight)} request(s) in flight")
            deadline = self.clock() + self.settings.shutdown_grace_seconds
            while self.in_flight and not self.abort_reason:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                self.wake.clear()
                self.settle_finished()
                if not self.in_flight:
                    break
                await self.sleep(remaining)
        self.settle_finished()
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.in_flight.clear()
        self.finished_tasks.clear()


# ======================================================================================================
# 12. Batch mode
# ======================================================================================================
#
# The same input and output through the Message Batches API: half the price, no per-minute limits,
# answers within 24 hours. The job's state (which batches exist and which input lines each holds) lives
# in a small JSON file beside the save file, rewritten atomically, so that the same command after a crash
# polls the batches it already submitted instead of paying for them twice.


def batches_url(request_url: str) -> str:
    """https://api.anthropic.com/v1/messages -> https://api.anthropic.com/v1/messages/batches"""
    return request_url.rstrip("/") + "/batches"


def batch_state_path(save_filepath: Path) -> Path:
    return save_filepath.with_name(save_filepath.name + ".batch_state.json")


def custom_id_for(line_number: int) -> str:
    return f"line-{line_number}"


def line_of(custom_id: str) -> int | None:
    match = re.fullmatch(r"line-(\d+)", custom_id or "")
    return int(match.group(1)) if match else None


def to_ranges(numbers: list[int]) -> list[list[int]]:
    """[1,2,3,7,8] -> [[1,3],[7,8]]: input lines of a batch, compactly."""
    ranges: list[list[int]] = []
    for number in numbers:
        if ranges and ranges[-1][1] == number - 1:
            ranges[-1][1] = number
        else:
            ranges.append([number, number])
    return ranges


def in_ranges(number: int, ranges: list[list[int]]) -> bool:
    index = bisect_left(ranges, [number, math.inf]) - 1
    return index >= 0 and ranges[index][0] <= number <= ranges[index][1]


def line_offsets(path: Path) -> array:
    """Byte offset of every line (index = line number - 1), 8 bytes a line, to re-read one line later."""
    offsets, offset = array("Q"), 0
    with open(path, "rb") as file:
        for raw in file:
            offsets.append(offset)
            offset += len(raw)
    return offsets


@dataclass
class BatchJobState:
    """What survives a crash: the batches submitted for this save file and how far each has come."""

    path: Path
    batches: list[dict] = field(default_factory=list)  # {"id", "lines": ranges, "requests", "written"}
    pending_since: float | None = None  # wall time a create call began and had not yet returned an id

    @classmethod
    def load(cls, path: Path) -> BatchJobState:
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, data.get("batches", []), data.get("pending_since"))

    def save(self) -> None:
        write_json_atomically(self.path, {"batches": self.batches, "pending_since": self.pending_since})

    def open_batches(self) -> list[dict]:
        return [batch for batch in self.batches if not batch.get("written")]

    def holds(self, line_number: int) -> bool:
        return any(in_ranges(line_number, batch["lines"]) for batch in self.open_batches())


class BatchClient:
    """The batch endpoints, with retries for transient errors and one-line aborts for refusals."""

    def __init__(self, session: aiohttp.ClientSession, request_url: str, headers: dict[str, str],
                 max_attempts: int, rng: random.Random):
        self.session, self.base, self.headers = session, batches_url(request_url), headers
        self.max_attempts, self.rng = max_attempts, rng
        self.proxy = proxy_for(request_url)

    async def call(self, method: str, url: str, data_factory: Callable[[], Any] | None = None) -> dict:
        """One endpoint call; `data_factory` makes a fresh body for each attempt."""
        for attempt in range(1, max(self.max_attempts, 3) + 1):
            try:
                async with self.session.request(method, url, headers=self.headers, proxy=self.proxy,
                                                data=data_factory() if data_factory else None,
                                                timeout=aiohttp.ClientTimeout(total=600)) as response:
                    body = await response.read()
                    if response.status == 200:
                        try:
                            return json.loads(body)
                        except ValueError:
                            outcome: Outcome = Retry(f"200 with a body that is not JSON: {snippet(body)}")
                    else:
                        outcome = classify(response.status, response.headers, body)
            except (asyncio.TimeoutError, TimeoutError, aiohttp.ClientError) as exc:
                outcome = Retry(f"connection error: {type(exc).__name__}: {exc}")
            if isinstance(outcome, Abort):
                raise RunAborted(outcome.reason)
            if isinstance(outcome, Fail):
                raise ProcessorError(f"{method} {url}: {outcome.reason}")
            delay = outcome.after_seconds if outcome.after_seconds is not None else backoff_seconds(attempt, self.rng)
            logger.warning(f"{method} {url}: {outcome.reason}; retrying in {delay:.1f} s")
            await asyncio.sleep(delay)
        raise ProcessorError(f"{method} {url}: no success after {max(self.max_attempts, 3)} attempts")

    async def create(self, body_path: Path) -> dict:
        def open_body():
            return open(body_path, "rb")  # a fresh file object per attempt; aiohttp streams and closes it
        return await self.call("POST", self.base, data_factory=open_body)

    async def retrieve(self, batch_id: str) -> dict:
        return await self.call("GET", f"{self.base}/{batch_id}")

    async def cancel(self, batch_id: str) -> dict:
        return await self.call("POST", f"{self.base}/{batch_id}/cancel")

    async def recent(self) -> list[dict]:
        return (await self.call("GET", f"{self.base}?limit=100")).get("data", [])

    async def results(self, batch: dict) -> Any:
        """Yield result items one by one from the results file, without holding it in memory."""
        url = batch.get("results_url") or f"{self.base}/{batch['id']}/results"
        async with self.session.get(url, headers=self.headers, proxy=self.proxy,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=300)) as response:
            if response.status != 200:
                outcome = classify(response.status, response.headers, await response.read())
                if isinstance(outcome, Abort):
                    raise RunAborted(outcome.reason)
                raise ProcessorError(f"results of {batch['id']}: {getattr(outcome, 'reason', outcome)}")
            async for raw in response.content:
                if raw.strip():
                    yield json.loads(raw)


def write_batch_request_files(jobs: Iterator[Job | InvalidLine], skip: Callable[[Job], bool], folder: Path,
                              on_invalid: Callable[[InvalidLine], None]) -> Iterator[tuple[Path, list[int]]]:
    """Stream valid, not yet answered jobs into batch request bodies on disk, split at the API's limits.

    Yields (path of a `{"requests": [...]}` body, its input line numbers). The tool's metadata stays
    here: only the body is sent.
    """
    file, lines, size, path = None, [], 0, None
    opening, closing = b'{"requests":[', b"]}"
    for item in jobs:
        if isinstance(item, InvalidLine):
            on_invalid(item)
            continue
        if skip(item):
            continue
        entry = json.dumps({"custom_id": custom_id_for(item.line_number), "params": item.body},
                           ensure_ascii=False).encode("utf-8")
        if file is not None and (len(lines) >= BATCH_MAX_REQUESTS
                                 or size + len(entry) + 1 + len(closing) > BATCH_MAX_BYTES):
            file.write(closing)
            file.close()
            yield path, lines
            file = None
        if file is None:
            handle, name = tempfile.mkstemp(prefix="batch-", suffix=".json", dir=folder)
            file, path, lines, size = os.fdopen(handle, "wb"), Path(name), [], len(opening)
            file.write(opening)
        if lines:
            file.write(b",")
            size += 1
        file.write(entry)
        size += len(entry)
        lines.append(item.line_number)
    if file is not None:
        file.write(closing)
        file.close()
        yield path, lines


class InputLines:
    """Re-reads single input lines by number, to pair each batch result with its request and metadata."""

    def __init__(self, path: Path):
        self.offsets = line_offsets(path)
        self.file = open(path, "rb")

    def job(self, line_number: int) -> Job | InvalidLine | None:
        if not 1 <= line_number <= len(self.offsets):
            return None
        self.file.seek(self.offsets[line_number - 1])
        return parse_request_line(self.file.readline(), line_number)

    def close(self) -> None:
        self.file.close()


def batch_result_record(job: Job, result: dict) -> tuple[list, bool]:
    """(result line, succeeded) for one item of a batch's results file."""
    kind = result.get("type")
    if kind == "succeeded" and is_valid_message(result.get("message")):
        return job.result_line(result["message"]), True
    if kind == "errored":
        error = result.get("error") or {}
        inner = error.get("error") if isinstance(error.get("error"), dict) else error
        reason = f"batch item errored: {inner.get('type', 'unknown_error')}: {inner.get('message', '')}"
    elif kind in ("expired", "canceled"):
        reason = f"batch item {kind}: not processed; run again to retry it"
    else:
        reason = f"batch item with an unexpected result: {json.dumps(result)[:200]}"
    return job.result_line([reason]), False


async def run_batch_job(requests_path: Path, save_path: Path, client: BatchClient, writer: ResultWriter,
                        stats: Stats, resume_index: ResumeIndex | None, cancel: bool, progress: bool,
                        stop: asyncio.Event, poll_interval: float = BATCH_POLL_INITIAL_SECONDS) -> None:
    """Submit what is not answered yet (unless cancelling), then poll every open batch and write its results."""
    state = BatchJobState.load(batch_state_path(save_path))
    if state.pending_since is not None:
        await adopt_pending_batch(state, client)
    if cancel:
        for batch in state.open_batches():
            logger.warning(f"cancelling batch {batch['id']}")
            await client.cancel(batch["id"])
    else:
        await submit_batches(requests_path, save_path, client, writer, stats, resume_index, state)
    if not state.open_batches():
        logger.info("no open batches")
    else:
        inputs = InputLines(requests_path)
        try:
            await poll_and_collect(state, client, inputs, writer, stats, progress, stop, poll_interval)
        finally:
            inputs.close()
    if not state.open_batches() and state.path.exists():
        state.path.unlink()


async def adopt_pending_batch(state: BatchJobState, client: BatchClient) -> None:
    """A crash came between asking for a batch and recording its id: find it rather than pay twice."""
    known = {batch["id"] for batch in state.batches}
    for batch in await client.recent():
        created = batch.get("created_at", "")
        try:
            created_at = datetime_to_timestamp(created)
        except ValueError:
            continue
        if batch["id"] not in known and created_at >= state.pending_since - 5:
            logger.warning(f"found batch {batch['id']}, submitted just before an interruption; its lines are "
                           "unknown, so its results are paired by custom_id")
            state.batches.append({"id": batch["id"], "lines": [], "requests": 0, "written": False, "adopted": True})
    state.pending_since = None
    state.save()


def datetime_to_timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def submit_batches(requests_path: Path, save_path: Path, client: BatchClient, writer: ResultWriter,
                         stats: Stats, resume_index: ResumeIndex | None, state: BatchJobState) -> None:
    def skip(job: Job) -> bool:
        if state.holds(job.line_number):
            return True  # already in a batch we are waiting for
        if resume_index is not None and resume_index.claim(request_fingerprint(job.body, job.metadata)):
            stats.skipped += 1
            return True
        return False

    def on_invalid(item: InvalidLine) -> None:
        logger.error(f"line {item.line_number}: {item.reason}; written as a failure, not sent")
        writer.write(item.result_line())
        stats.invalid_lines += 1
        stats.failed += 1

    with tempfile.TemporaryDirectory(prefix="batches-", dir=save_path.parent) as folder:
        for body_path, lines in write_batch_request_files(read_jobs(requests_path), skip, Path(folder), on_invalid):
            state.pending_since = time.time()
            state.save()
            batch = await client.create(body_path)
            state.batches.append({"id": batch["id"], "lines": to_ranges(lines), "requests": len(lines),
                                  "written": False})
            state.pending_since = None
            state.save()
            body_path.unlink()
            logger.info(f"submitted batch {batch['id']} with {len(lines):,} request(s)")


async def poll_and_collect(state: BatchJobState, client: BatchClient, inputs: InputLines, writer: ResultWriter,
                           stats: Stats, progress: bool, stop: asyncio.Event,
                           poll_interval: float = BATCH_POLL_INITIAL_SECONDS) -> None:
    """Poll with backoff (5 s doubling to 60 s) until each batch ends; then stream its results out."""
    total = sum(batch["requests"] for batch in state.open_batches()) or None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="req", file=sys.stderr, desc="batches")
    delay = poll_interval
    try:
        while state.open_batches() and not stop.is_set():
            counted = 0
            for batch in state.open_batches():
                info = await client.retrieve(batch["id"])
                counts = info.get("request_counts") or {}
                counted += sum(counts.get(k, 0) for k in ("succeeded", "errored", "canceled", "expired"))
                if info.get("processing_status") == "ended":
                    await write_batch_results(batch, info, state, client, inputs, writer, stats)
                    delay = poll_interval
            if bar is not None:
                bar.n = counted
                bar.refresh()
            else:
                logger.info(f"batches: {counted:,} of {total or 0:,} request(s) processed; "
                            f"{len(state.open_batches())} batch(es) open")
            if state.open_batches():
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(BATCH_POLL_MAX_SECONDS, delay * 2)
    finally:
        if bar is not None:
            bar.close()


async def write_batch_results(batch: dict, info: dict, state: BatchJobState, client: BatchClient,
                              inputs: InputLines, writer: ResultWriter, stats: Stats) -> None:
    """Write one line per item of an ended batch (skipping lines already written by an interrupted try)."""
    written_before = None
    if batch.get("write_offset") is None:
        writer.flush()
        batch["write_offset"] = writer.path.stat().st_size
        state.save()
    else:
        # An earlier run was writing this batch's results when it stopped: everything from the offset it
        # recorded on is this batch's, so skip those items this time.
        written_before = ResumeIndex(array("Q", (fingerprint for _, fingerprint, _ in
                                                 iter_save_file(writer.path, batch["write_offset"]))))
        logger.info(f"batch {batch['id']}: resuming the writing of its results ({len(written_before):,} written)")
    async for item in client.results(info):
        line_number = line_of(item.get("custom_id", ""))
        job = inputs.job(line_number) if line_number is not None else None
        if not isinstance(job, Job):
            logger.error(f"batch {batch['id']}: result for unknown custom_id {item.get('custom_id')!r}; skipped")
            continue
        record, succeeded = batch_result_record(job, item.get("result") or {})
        if written_before is not None and written_before.claim(request_fingerprint(job.body, job.metadata)):
            continue
        writer.write(record)
        if succeeded:
            stats.succeeded += 1
            stats.add_usage(job.model, record[1]["usage"], batch=True)
        else:
            stats.failed += 1
            stats.errors_by_kind[(item.get("result") or {}).get("type", "unknown")] += 1
    batch["written"] = True
    state.save()
    logger.info(f"batch {batch['id']} ended; its results are written")


# ======================================================================================================
# 13. Running a job
# ======================================================================================================


@dataclass
class RunSummary:
    """What a run did; `exit_status` follows the command's convention."""

    requests_filepath: str
    save_filepath: str
    succeeded: int = 0
    failed: int = 0
    invalid_lines: int = 0
    skipped: int = 0
    attempts: int = 0
    rate_limited: int = 0
    errors_by_kind: dict = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    cache_hit_rate: float | None = None
    cost_usd: float = 0.0
    cache_saved_usd: float = 0.0
    unpriced_models: list = field(default_factory=list)
    elapsed_seconds: float = 0.0
    stopped_by: str | None = None  # "SIGINT" or "SIGTERM"
    aborted: str | None = None
    unanswered: int = 0  # requests neither answered nor failed when the run stopped
    batch: bool = False  # sent through the Message Batches API (half price)

    @property
    def exit_status(self) -> int:
        if self.aborted:
            return EXIT_ABORTED
        if self.stopped_by:
            return EXIT_SIGTERM if self.stopped_by == "SIGTERM" else EXIT_SIGINT
        return EXIT_SOME_FAILED if self.failed else EXIT_OK

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"exit_status": self.exit_status}


def summarize(stats: Stats, requests_filepath: Path, save_filepath: Path, elapsed: float,
              stopped_by: str | None, aborted: str | None, batch: bool = False) -> RunSummary:
    reads_and_writes = stats.cache_reads + stats.cache_writes
    unanswered = 0
    if (stopped_by or aborted) and stats.total_lines is not None:
        unanswered = max(0, stats.total_lines - stats.done)
    return RunSummary(
        requests_filepath=str(requests_filepath), save_filepath=str(save_filepath),
        succeeded=stats.succeeded, failed=stats.failed, invalid_lines=stats.invalid_lines,
        skipped=stats.skipped, attempts=stats.attempts, rate_limited=stats.rate_limited,
        errors_by_kind=dict(stats.errors_by_kind), input_tokens=stats.input_tokens,
        output_tokens=stats.output_tokens, cache_write_tokens=stats.cache_write_tokens,
        cache_read_tokens=stats.cache_read_tokens,
        cache_hit_rate=(stats.cache_reads / reads_and_writes) if reads_and_writes else None,
        cost_usd=round(stats.cost_usd, 6), cache_saved_usd=round(stats.cache_saved_usd, 6),
        unpriced_models=sorted(stats.unpriced_models), elapsed_seconds=round(elapsed, 3),
        stopped_by=stopped_by, aborted=aborted, unanswered=unanswered, batch=batch)


def log_summary(summary: RunSummary, limits: dict[str, LimitSetting]) -> None:
    s = summary
    logger.info(f"Parallel processing complete. Results saved to {s.save_filepath}" if not (s.stopped_by or s.aborted)
                else f"Run stopped early. Results so far are in {s.save_filepath}")
    logger.info(f"requests: {s.succeeded:,} succeeded, {s.failed:,} failed ({s.invalid_lines:,} invalid lines), "
                f"{s.skipped:,} skipped as already done; {s.attempts:,} attempts, {s.rate_limited:,} rate limited (429)")
    if s.errors_by_kind:
        logger.info("errors by kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s.errors_by_kind.items())))
    hit = f", hit rate {s.cache_hit_rate:.0%}" if s.cache_hit_rate is not None else ""
    logger.info(f"tokens: input {s.input_tokens:,}, output {s.output_tokens:,}, cache writes "
                f"{s.cache_write_tokens:,}, cache reads {s.cache_read_tokens:,}{hit}")
    cost = f"cost: ${s.cost_usd:,.4f}"
    if s.cache_saved_usd:
        cost += f" (caching saved ${s.cache_saved_usd:,.4f})"
    if s.unpriced_models:
        cost += f"; no price known for {', '.join(s.unpriced_models)} (not counted)"
    logger.info(cost)
    minutes = s.elapsed_seconds / 60
    if minutes > 0 and s.attempts:
        rpm = s.attempts / minutes
        limit = limits["requests"].per_minute
        logger.info(f"elapsed {s.elapsed_seconds:,.1f} s; {rpm:,.0f} requests/min (limit {limit:,.0f}), "
                    f"{(s.input_tokens + s.cache_write_tokens) / minutes:,.0f} input tokens/min, "
                    f"{s.output_tokens / minutes:,.0f} output tokens/min")
    if s.failed:
        logger.warning(f"{s.failed:,} request(s) failed; their errors are in {s.save_filepath}. "
                       "Running the same command again retries them.")
    if s.rate_limited:
        logger.warning(f"{s.rate_limited:,} rate limit errors received. Consider running at a lower rate.")
    if s.stopped_by or s.aborted:
        logger.warning("To resume, run the same command again: answered requests are skipped.")


def parse_limit(value: Any, default: float, name: str) -> LimitSetting:
    """A limit flag: a positive number, or `auto` (start at the default, then follow the service)."""
    if isinstance(value, LimitSetting):
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return LimitSetting(float(default), auto=True)
    number = parse_number(value)
    if number is None or number <= 0:
        raise UsageError(f"--{name} must be a positive number or auto, not {value!r}")
    return LimitSetting(number)


def parse_limits(requests_per_minute: Any, input_tokens_per_minute: Any,
                 output_tokens_per_minute: Any) -> dict[str, LimitSetting]:
    """The three limit flags, by bucket."""
    return {"requests": parse_limit(requests_per_minute, DEFAULT_MAX_REQUESTS_PER_MINUTE, "max_requests_per_minute"),
            "input-tokens": parse_limit(input_tokens_per_minute, DEFAULT_MAX_INPUT_TOKENS_PER_MINUTE,
                                        "max_tokens_per_minute"),
            "output-tokens": parse_limit(output_tokens_per_minute, DEFAULT_MAX_OUTPUT_TOKENS_PER_MINUTE,
                                         "max_output_tokens_per_minute")}


def default_save_filepath(requests_filepath: Path) -> Path:
    name = requests_filepath.name
    stem = name.removesuffix(".jsonl")
    return requests_filepath.with_name(stem + "_results.jsonl")


def check_files(requests_filepath: Path, save_filepath: Path) -> None:
    """Refuse, before any request, what cannot work: a missing input, an unwritable save path."""
    if not requests_filepath.is_file():
        raise UsageError(f"requests file not found: {requests_filepath}")
    try:
        with open(requests_filepath, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise UsageError(f"cannot read the requests file {requests_filepath}: {exc.strerror}") from exc
    if save_filepath.exists() and save_filepath.resolve() == requests_filepath.resolve():
        raise UsageError("the save file is the requests file; choose another --save_filepath")
    try:
        save_filepath.parent.mkdir(parents=True, exist_ok=True)
        with open(save_filepath, "ab"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write the save file {save_filepath}: {exc.strerror or exc}") from exc


def make_redactor(secret: str | None) -> Callable[[str], str]:
    """A function that removes the API key from any text, so it never reaches a log or a file."""
    if not secret or len(secret) < MIN_SECRET_LENGTH_TO_REDACT:
        return lambda text: text  # not a real key (a test's "x"): masking it would mangle the output
    return lambda text: text.replace(secret, "[redacted]") if secret in text else text


def prepare_save_file(save_filepath: Path, overwrite: bool) -> tuple[ResumeIndex | None, int]:
    """Start afresh, or resume: returns (index of answered requests, number of failure lines)."""
    if overwrite and save_filepath.exists() and save_filepath.stat().st_size:
        lines = count_lines(save_filepath)
        logger.warning(f"--overwrite: discarding {lines:,} line(s) of earlier results in {save_filepath}")
        save_filepath.write_bytes(b"")
    scan = scan_save_file(save_filepath)
    if scan.torn_bytes:
        logger.warning(f"{save_filepath}: dropping a partial last line ({scan.torn_bytes} bytes) left by an "
                       "interrupted run; that request will be sent again")
        with open(save_filepath, "r+b") as file:
            file.truncate(scan.valid_bytes)
    if not scan.successes and not scan.failure_lines:
        return None, 0
    logger.info(f"resuming: {len(scan.successes):,} request(s) already answered in {save_filepath} will be "
                f"skipped; {scan.failure_lines:,} earlier failure(s) will be tried again")
    return ResumeIndex(scan.successes), scan.failure_lines


class ProgressBar:
    """A tqdm bar on stderr: done of total, failed, in flight, current rates against the limits, what
    binds, cache hits, cost so far, and tqdm's ETA. Rates are taken over the last RATE_WINDOW_SECONDS."""

    REFRESH_SECONDS = 0.5
    RATE_WINDOW_SECONDS = 15.0

    def __init__(self, total: int | None, stats: Stats, limits: dict[str, LimitSetting]):
        from tqdm import tqdm

        self.stats = stats
        self.limits = limits
        self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
        self.scheduler: Scheduler | None = None
        self.last_refresh = 0.0
        self.samples: deque[tuple[float, int, int, int]] = deque()  # (time, attempts, input, output)

    def update(self) -> None:
        now = time.monotonic()
        self.bar.n = self.stats.done
        if now - self.last_refresh < self.REFRESH_SECONDS:
            return
        self.last_refresh = now
        s = self.stats
        self.samples.append((now, s.attempts, s.input_tokens + s.cache_write_tokens, s.output_tokens))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW_SECONDS:
            self.samples.popleft()
        first = self.samples[0]
        minutes = max(1e-9, (now - first[0]) / 60)
        per_minute = [(latest - earliest) / minutes for latest, earliest in zip(self.samples[-1][1:], first[1:])]
        limits = [self.limits[kind].per_minute for kind in LIMIT_KINDS]
        postfix = {"failed": s.failed, "in flight": len(self.scheduler.in_flight) if self.scheduler else 0}
        for name, rate, limit in zip(("req/min", "in tok/min", "out tok/min"), per_minute, limits):
            postfix[name] = f"{rate:,.0f}/{limit:,.0f}"
        binding = self.binding_limit()
        if binding:
            postfix["binds"] = binding
        if s.cache_reads + s.cache_writes:
            postfix["cache hits"] = f"{s.cache_reads / (s.cache_reads + s.cache_writes):.0%}"
        postfix["cost"] = f"${s.cost_usd:,.2f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def binding_limit(self) -> str | None:
        if not self.scheduler:
            return None
        now, emptiest = time.monotonic(), None
        for limiter in self.scheduler.limiters.values():
            if limiter.paused_until > now:
                return "429 pause"
            for kind, bucket in limiter.buckets.items():
                fullness = bucket.level(now) / bucket.capacity
                if emptiest is None or fullness < emptiest[0]:
                    emptiest = (fullness, kind)
        return emptiest[1] if emptiest and emptiest[0] < 0.1 else None

    def close(self) -> None:
        self.bar.n = self.stats.done
        self.bar.refresh()
        self.bar.close()


async def process_api_requests_from_file(
    requests_filepath: str | os.PathLike,
    save_filepath: str | os.PathLike | None = None,
    request_url: str = DEFAULT_REQUEST_URL,
    use_caching: bool = False,
    api_key: str | None = None,
    max_requests_per_minute: float | str = DEFAULT_MAX_REQUESTS_PER_MINUTE,
    max_tokens_per_minute: float | str = DEFAULT_MAX_INPUT_TOKENS_PER_MINUTE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    *,
    max_output_tokens_per_minute: float | str = DEFAULT_MAX_OUTPUT_TOKENS_PER_MINUTE,
    max_concurrent_requests: int | None = None,
    request_timeout: float | None = None,
    anthropic_version: str = DEFAULT_ANTHROPIC_VERSION,
    anthropic_beta: str | None = None,
    stream: str = "auto",
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS,
    overwrite: bool = False,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_SECONDS,
    progress: bool = False,
    summary_filepath: str | os.PathLike | None = None,
    handle_signals: bool = False,
    batch: bool = False,
    batch_cancel: bool = False,
    batch_poll_interval: float = BATCH_POLL_INITIAL_SECONDS,
    count_tokens: Callable[[str], int] | None = None,
    backoff_scale: float = 1.0,
) -> RunSummary:
    """Send every request of a JSONL file within the given limits; append each result to the save file.

    The first eight parameters keep the original cookbook's order; the rest are keyword-only and mirror
    the command-line flags. Raises UsageError for unusable arguments or files (nothing is sent then).
    Returns a RunSummary; `aborted` is set when the service refused the run (key, billing, permission).
    """
    started = time.monotonic()
    requests_path = Path(requests_filepath)
    save_path = Path(save_filepath) if save_filepath else default_save_filepath(requests_path)
    limits = parse_limits(max_requests_per_minute, max_tokens_per_minute, max_output_tokens_per_minute)
    if max_attempts < 1:
        raise UsageError("--max_attempts must be at least 1")
    if stream not in ("auto", "always", "never"):
        raise UsageError("--stream must be auto, always or never")
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise UsageError("--max_concurrent_requests must be at least 1")
    api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
    if not api_key:
        raise UsageError("no API key: set ANTHROPIC_API_KEY in the environment or a .env file (or pass --api_key)")
    check_files(requests_path, save_path)
    redact = make_redactor(api_key)

    if overwrite and batch_state_path(save_path).exists():
        logger.warning(f"--overwrite: forgetting the batches recorded in {batch_state_path(save_path)}")
        batch_state_path(save_path).unlink()
    resume_index, old_failures = prepare_save_file(save_path, overwrite)
    if count_tokens is None:
        count_tokens, tokenizer_name = load_tokenizer()
    else:
        tokenizer_name = "given"
    stats = Stats(total_lines=count_lines(requests_path))
    logger.info(f"Starting: {stats.total_lines:,} line(s) from {requests_path} to {save_path}; limits per model: "
                f"{fmt_limit(limits['requests'])} requests/min, {fmt_limit(limits['input-tokens'])} input tokens/min, "
                f"{fmt_limit(limits['output-tokens'])} output tokens/min; tokens counted with {tokenizer_name}")

    max_in_flight = max_concurrent_requests or 5000
    writer = ResultWriter(save_path, redact, api_key)
    bar = ProgressBar(stats.total_lines, stats, limits) if progress and not (batch or batch_cancel) else None
    connector = aiohttp.TCPConnector(limit=max_in_flight, limit_per_host=max_in_flight)
    stop_signals: list[str] = []
    abort_reason: str | None = None
    headers = build_headers(api_key, anthropic_version, anthropic_beta)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            if batch or batch_cancel:
                stop = asyncio.Event()
                client = BatchClient(session, request_url, headers, max_attempts, random.Random())
                with signal_handlers(lambda reason: stop.set(), stop_signals) if handle_signals else contextlib.nullcontext():
                    try:
                        await run_batch_job(requests_path, save_path, client, writer, stats, resume_index,
                                            batch_cancel, progress, stop, batch_poll_interval)
                    except RunAborted as exc:
                        abort_reason = str(exc)
            else:
                transport = Transport(session, request_url, headers, stream, request_timeout, stream_idle_timeout,
                                      proxy_for(request_url))
                scheduler = Scheduler(
                    read_jobs(requests_path),
                    SchedulerSettings(limits, max_attempts, max_in_flight, bool(use_caching), shutdown_grace,
                                      backoff_scale),
                    send=lambda body, **options: send_attempt(transport, body, **options), writer=writer,
                    estimator=Estimator(count_tokens),
                    stats=stats, resume_index=resume_index, on_progress=bar.update if bar else None)
                if bar:
                    bar.scheduler = scheduler
                with signal_handlers(scheduler.request_stop, stop_signals) if handle_signals else contextlib.nullcontext():
                    await scheduler.run()
                abort_reason = scheduler.abort_reason
    finally:
        writer.close()
        if bar:
            bar.close()

    stopped_by = stop_signals[0] if stop_signals else None
    finished = not (stopped_by or abort_reason)
    if batch and finished and batch_state_path(save_path).exists():
        finished = False  # batches are still open (the run was interrupted while polling)
    if abort_reason:
        abort_reason = redact(abort_reason)
        logger.error(f"Run aborted: {abort_reason}")
    elif finished and (old_failures or batch):
        # Every request without a success line was tried again in this run, so the failure lines of
        # earlier runs are superseded: keep exactly one line per input request.
        dropped = compact_save_file(save_path, requests_path)
        if dropped:
            logger.info(f"removed {dropped:,} superseded failure line(s) of earlier runs from {save_path}")
    summary = summarize(stats, requests_path, save_path, time.monotonic() - started, stopped_by, abort_reason,
                        batch=batch or batch_cancel)
    log_summary(summary, limits)
    if summary_filepath:
        write_json_atomically(Path(summary_filepath), summary.to_dict())
    return summary


def write_json_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        json.dump(data, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def fmt_limit(setting: LimitSetting) -> str:
    return f"auto (from {setting.per_minute:,.0f})" if setting.auto else f"{setting.per_minute:,.0f}"


@contextlib.contextmanager
def signal_handlers(request_stop: Callable[[str], None], received: list[str]):
    """First SIGINT/SIGTERM: stop gracefully. A second SIGINT: leave at once (written lines are whole)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if received and signum == signal.SIGINT:
            logger.warning("second Ctrl-C: exiting now; run the same command again to resume")
            os._exit(EXIT_SIGINT)
        if not received:
            received.append(name)
            request_stop(f"{name} received")

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


@dataclass
class ModelEstimate:
    """Dry-run totals for one model."""

    requests: int = 0
    input_tokens: int = 0  # uncorrected estimate of every prompt in full
    cached_prefix_tokens: int = 0  # of which: tokens of cached prefixes read after their first write
    first_write_tokens: int = 0  # of which: tokens of each distinct prefix, written once
    max_output_tokens: int = 0


def dry_run(requests_path: Path, max_requests_per_minute: float | str, max_tokens_per_minute: float | str,
            max_output_tokens_per_minute: float | str, use_caching: bool,
            count_tokens: Callable[[str], int] | None = None, out: Any = None) -> dict[str, ModelEstimate]:
    """Read and validate the whole file; print requests, tokens, cost range and duration per model.

    Sends nothing and needs neither a key nor a network. Input tokens are shown as a range, because the
    tokenizer we have (cl100k_base or the byte estimate) is not Claude's: from our count to 1.4x it.
    Output tokens can only be bounded by max_tokens, so the cost and the duration are ranges too.
    """
    out = out or sys.stdout
    if not requests_path.is_file():
        raise UsageError(f"requests file not found: {requests_path}")
    limits = parse_limits(max_requests_per_minute, max_tokens_per_minute, max_output_tokens_per_minute)
    if count_tokens is None:
        count_tokens, _ = load_tokenizer()
    models: dict[str, ModelEstimate] = {}
    prefixes_seen: set[str] = set()
    invalid = 0
    for item in read_jobs(requests_path):
        if isinstance(item, InvalidLine):
            invalid += 1
            print(f"line {item.line_number}: {item.reason}", file=out)
            continue
        estimate = estimate_input_tokens(item.body, count_tokens, track_cache_prefix=use_caching)
        totals = models.setdefault(item.model, ModelEstimate())
        totals.requests += 1
        totals.input_tokens += estimate.total
        totals.max_output_tokens += item.body["max_tokens"]
        if use_caching and estimate.prefix_key:
            if estimate.prefix_key in prefixes_seen:
                totals.cached_prefix_tokens += estimate.cached_prefix
            else:
                prefixes_seen.add(estimate.prefix_key)
                totals.first_write_tokens += estimate.cached_prefix

    print(f"Dry run of {requests_path}: {sum(m.requests for m in models.values()):,} valid request(s), "
          f"{invalid:,} invalid line(s); nothing was sent.", file=out)
    for model, m in sorted(models.items()):
        counted_low = m.input_tokens - m.cached_prefix_tokens  # what the input limit counts
        prices = prices_for(model)
        print(f"\n{model}: {m.requests:,} requests", file=out)
        print(f"  input tokens   ~{m.input_tokens:,} to {math.ceil(m.input_tokens * 1.4):,}"
              + (f" ({m.cached_prefix_tokens:,} of them cache reads)" if m.cached_prefix_tokens else ""), file=out)
        print(f"  output tokens  at most {m.max_output_tokens:,} (the sum of max_tokens)", file=out)
        if prices is None:
            print(f"  cost           unknown: no price for {model} in this script's table", file=out)
        else:
            input_price, write_5m, _, read_price, output_price = prices
            plain = counted_low - m.first_write_tokens
            low = (plain * input_price + m.first_write_tokens * write_5m + m.cached_prefix_tokens * read_price
                   + m.requests * output_price) / 1e6
            high = (plain * 1.4 * input_price + m.first_write_tokens * 1.4 * write_5m
                    + m.cached_prefix_tokens * 1.4 * read_price + m.max_output_tokens * output_price) / 1e6
            print(f"  cost           ${low:,.4f} to ${high:,.4f} (batch mode: half; prices checked {PRICES_CHECKED})",
                  file=out)
        # A full bucket is spent at once; the rest of the demand comes at the refill rate.
        demand = {"requests": (m.requests, limits["requests"].per_minute),
                  "input tokens": (counted_low * 1.2, limits["input-tokens"].per_minute),
                  "output tokens": (m.max_output_tokens, limits["output-tokens"].per_minute)}
        minutes = {kind: max(0.0, need - limit) / limit for kind, (need, limit) in demand.items()}
        fastest = max(minutes["requests"], minutes["input tokens"])
        slowest_kind = max(minutes, key=minutes.get)
        auto = any(setting.auto for setting in limits.values())
        print(f"  duration       {fmt_minutes(fastest)} to {fmt_minutes(minutes[slowest_kind])} at "
              f"{'the starting ' if auto else ''}limits of {limits['requests'].per_minute:,.0f} requests, "
              f"{limits['input-tokens'].per_minute:,.0f} input and {limits['output-tokens'].per_minute:,.0f} "
              f"output tokens per minute; binds: {slowest_kind}"
              + (" if answers use all of max_tokens" if slowest_kind == "output tokens" else ""), file=out)
    return models


def fmt_minutes(minutes: float) -> str:
    seconds = minutes * 60
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if minutes < 120:
        return f"{minutes:,.1f} min"
    return f"{minutes / 60:,.1f} h"


# ======================================================================================================
# 14. Command line
# ======================================================================================================

LOG_LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def parse_bool(value: Any) -> bool:
    """True/False/true/false/1/0/yes/no. (The original took any non-empty string, even "False", as True.)"""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {value!r}")


def parse_logging_level(value: str) -> int:
    text = str(value).strip().upper()
    if text in LOG_LEVELS:
        return LOG_LEVELS[text]
    if text.isdigit() and 5 <= int(text) <= 50:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)} or a number from 5 to 50")


def positive_float(value: str) -> float:
    number = parse_number(value)
    if number is None or number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {value!r}")
    return number


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {value!r}")
    return number


def limit_value(value: str) -> str | float:
    if value.strip().lower() == "auto":
        return "auto"
    return positive_float(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="api_request_parallel_processor.py",
        description="Send a JSONL file of Claude Messages API requests in parallel, within your rate limits.")
    add = parser.add_argument
    add("--requests_filepath", required=True, help="JSONL file, one Messages API request body per line")
    add("--save_filepath", default=None, help="where results are appended (default: <requests>_results.jsonl)")
    add("--request_url", default=DEFAULT_REQUEST_URL, help=f"Messages API endpoint (default {DEFAULT_REQUEST_URL})")
    add("--api_key", default=None, help="API key (default: ANTHROPIC_API_KEY from the environment or .env)")
    add("--max_requests_per_minute", type=limit_value, default=DEFAULT_MAX_REQUESTS_PER_MINUTE,
        help="requests per minute per model, or auto (default 40)")
    add("--max_tokens_per_minute", type=limit_value, default=DEFAULT_MAX_INPUT_TOKENS_PER_MINUTE,
        help="input tokens per minute per model, or auto (default 16000)")
    add("--max_output_tokens_per_minute", type=limit_value, default=DEFAULT_MAX_OUTPUT_TOKENS_PER_MINUTE,
        help="output tokens per minute per model, or auto (default 6400)")
    add("--max_attempts", type=positive_int, default=DEFAULT_MAX_ATTEMPTS,
        help="attempts per request before it is written as a failure (default 5)")
    add("--logging_level", type=parse_logging_level, default="INFO",
        help="TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL or 5..50 (default INFO)")
    add("--use_caching", type=parse_bool, nargs="?", const=True, default=False,
        help="True/False; bare flag means True: write each cached prefix once, then read it (default False)")
    add("--max_concurrent_requests", type=positive_int, default=None,
        help="cap on requests in flight (default 5,000)")
    add("--request_timeout", type=positive_float, default=None,
        help="seconds per non-streamed attempt (default 600, longer for large max_tokens)")
    add("--anthropic_version", default=DEFAULT_ANTHROPIC_VERSION, help="anthropic-version header (default 2023-06-01)")
    add("--anthropic_beta", default=None, help="comma-separated beta names, sent as the anthropic-beta header")
    add("--stream", choices=("auto", "always", "never"), default="auto",
        help="stream answers: auto (long ones only), always, never (default auto)")
    add("--stream_idle_timeout", type=positive_float, default=DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS,
        help="seconds of silence that end a streamed attempt (default 120)")
    add("--overwrite", action="store_true", help="discard earlier results in the save file instead of resuming")
    add("--shutdown_grace", type=float, default=DEFAULT_SHUTDOWN_GRACE_SECONDS,
        help="on Ctrl-C or SIGTERM, seconds to wait for requests in flight (default 30)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show a progress bar even when stderr is not a terminal")
    progress.add_argument("--no_progress", dest="progress", action="store_false",
                          help="no progress bar; log progress once a minute instead")
    add("--summary_filepath", default=None, help="also write the final summary to this file as JSON")
    add("--dry_run", action="store_true", help="validate and estimate tokens, cost and duration; send nothing")
    add("--batch", action="store_true", help="use the Message Batches API: half price, answers within 24 h")
    add("--batch_cancel", action="store_true", help="cancel this job's open batches, then write what they answered")
    add("--batch_poll_interval", type=positive_float, default=BATCH_POLL_INITIAL_SECONDS,
        help="first wait between batch status checks, doubling to 60 s (default 5)")
    return parser


def configure_logging(level: int, redact: Callable[[str], str], through_progress_bar: bool) -> None:
    """One loguru sink on stderr that never shows the API key and does not tear the progress bar."""
    logger.remove()
    if through_progress_bar:
        from tqdm import tqdm

        def sink(message: str) -> None:
            tqdm.write(redact(str(message)).rstrip("\n"), file=sys.stderr)
    else:
        def sink(message: str) -> None:
            sys.stderr.write(redact(str(message)))
    logger.add(sink, level=level, colorize=False,
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {message}", backtrace=False, diagnose=False)


def main(argv: list[str] | None = None) -> int:
    """The command line: parse the flags, run the job, return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the problem
        return EXIT_USAGE if exc.code else EXIT_OK
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)  # a variable already set wins over .env
    api_key = args.api_key or os.environ.get("ANTHROPIC_API_KEY")
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    configure_logging(args.logging_level, make_redactor(api_key), progress and not args.dry_run)
    if args.api_key:
        logger.warning("--api_key puts the key where other users of this machine can see it (process list, "
                       "shell history); prefer ANTHROPIC_API_KEY in the environment or a .env file")
    try:
        if args.dry_run:
            dry_run(Path(args.requests_filepath), args.max_requests_per_minute, args.max_tokens_per_minute,
                    args.max_output_tokens_per_minute, bool(args.use_caching))
            return EXIT_OK
        summary = asyncio.run(process_api_requests_from_file(
            args.requests_filepath, args.save_filepath, args.request_url, args.use_caching, api_key,
            args.max_requests_per_minute, args.max_tokens_per_minute, args.max_attempts,
            max_output_tokens_per_minute=args.max_output_tokens_per_minute,
            max_concurrent_requests=args.max_concurrent_requests, request_timeout=args.request_timeout,
            anthropic_version=args.anthropic_version, anthropic_beta=args.anthropic_beta, stream=args.stream,
            stream_idle_timeout=args.stream_idle_timeout, overwrite=args.overwrite,
            shutdown_grace=args.shutdown_grace, progress=progress, summary_filepath=args.summary_filepath,
            handle_signals=True, batch=args.batch, batch_cancel=args.batch_cancel,
            batch_poll_interval=args.batch_poll_interval,
            backoff_scale=parse_number(os.environ.get("APPP_BACKOFF_SCALE")) or 1.0))
    except UsageError as exc:
        logger.error(str(exc))
        return EXIT_USAGE
    except ProcessorError as exc:
        logger.error(str(exc))
        return EXIT_SOME_FAILED
    return summary.exit_status


if __name__ == "__main__":
    sys.exit(main())

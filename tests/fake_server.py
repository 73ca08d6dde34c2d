"""A fake Anthropic Messages API server that behaves like the real service.

Why it exists: the parallel processor has to be tested against rate limits, retries, prompt caching,
streaming and the Message Batches API without an API key, without spending money and without network
access. This server reproduces the facts listed in the project's notes on the Anthropic API closely
enough that a client which passes its tests here should also work against api.anthropic.com.

Three ways to use it
- pytest, in a background thread:
      with ServerThread(ServerConfig(limits={"default": ModelLimits(requests_per_minute=60)})) as srv:
          ... send requests to srv.messages_url ...
          print(srv.stats_snapshot()["rate_limited"])
- async code, on the current event loop:
      server = FakeAnthropicServer(config)
      base_url = await server.start()
      ...
      await server.stop()
- a shell, to try the processor without an API key:
      python tests/fake_server.py --port 8080 --rpm 50 --itpm 30000 --otpm 8000 --latency 0.5,3
  then run the processor with --request_url http://127.0.0.1:8080/v1/messages and any API key.
  `curl 127.0.0.1:8080/__stats` shows what the server saw; `curl -d '{"fault_rate": 0.1}'
  127.0.0.1:8080/__config` changes its behaviour while it runs.

What it reproduces
- Endpoints: POST /v1/messages (JSON or SSE), POST /v1/messages/count_tokens, and the batch endpoints
  POST/GET /v1/messages/batches, GET/DELETE /v1/messages/batches/{id}, GET .../{id}/results,
  POST .../{id}/cancel. Test-only: GET /__stats, GET and POST /__config.
- Authentication (x-api-key, 401) and anthropic-version (400), request validation (400
  invalid_request_error, including "Extra inputs are not permitted" for unknown top-level keys and any
  metadata key other than user_id), 413 with a plain-text body above 32 MB, 404 for the model
  "claude-does-not-exist".
- A fake "Claude tokenizer" that deliberately counts about 1.2-1.4x what tiktoken cl100k counts for
  English, so a client must learn a correction from usage. Images, PDFs, tools and tool-use overhead
  are counted too.
- Rate limits per model class (the model id without its date): three continuously refilled token buckets
  (requests, input tokens, output tokens), 429 rate_limit_error with retry-after, and the
  anthropic-ratelimit-* headers on every response after authentication. Output tokens are charged as
  produced (2026 documentation) or reserved from max_tokens at admission (2025 documentation), see
  ServerConfig.output_accounting.
- Prompt caching: writes, reads, TTL refresh, and the rule that concurrent requests with the same cold
  prefix each write it.
- Streaming with the real event sequence; the reassembled stream equals the non-streamed message.
- Message Batches with linear progress, shuffled JSONL results, errored, expired and canceled items.

Markers: write them anywhere in the request text (usually a user message)
  [[fault:CODE]]      always answer with fault CODE
  [[fault:CODE*N]]    answer with CODE for the first N attempts of this exact body, then normally
  [[spend_limit]]     429 whose error has details.error_code "enforced_spend_limit_reached", no retry-after
CODE is a status (400 401 402 403 404 409 413 429 500 504 529 ...: a JSON error of the matching type),
NNN_html (an HTML page from a proxy, e.g. 502_html, 503_html), drop (close the connection), hang
(never answer), bad_json (200 with a truncated JSON body), no_content (200 message without "content"),
stream_error (an SSE error event mid-stream) or stream_drop (the connection cut mid-stream). In a batch,
any fault marker makes that item errored.

Where faults sit (one rule): a fault that replaces the HTTP response is decided and answered before rate
limiting, so it costs no rate-limit capacity. A fault inside a stream (stream_error, stream_drop, and
bad_json or no_content on a streamed request) happens after admission and charges the output tokens
sent before the cut. On a non-streamed request stream_error becomes a 529 and stream_drop a drop.

Outline of this file
  constants; configuration and statistics; model classes and fingerprints; the fake tokenizer;
  validation; fault markers; generated answers and SSE events; token buckets; prompt cache; batches;
  the HTTP server; the background-thread runner; the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# ==================================================================================================
# Constants
# ==================================================================================================

MAX_MESSAGE_BODY_BYTES = 32 * 1024 * 1024
MAX_BATCH_BODY_BYTES = 256 * 1024 * 1024
MAX_BATCH_REQUESTS = 100_000
MAX_OUTPUT_TOKENS = 128_000  # the largest max_tokens any current model accepts
MAX_CACHE_BREAKPOINTS = 4
NONEXISTENT_MODEL = "claude-does-not-exist"
DEFAULT_CLASS = "default"

# Fake tokenizer overheads: the real API adds hidden tokens per request, per message and for tool use.
REQUEST_OVERHEAD_TOKENS = 8
MESSAGE_OVERHEAD_TOKENS = 4
TOOLS_OVERHEAD_TOKENS = 300  # the real tool-use system prompt is ~300-350 tokens
IMAGE_URL_TOKENS = 1600  # the fake cannot fetch URLs; a large image costs about this much
IMAGE_MAX_LONG_EDGE = 1568
IMAGE_MAX_TOKENS = 1600  # the real API also downsizes images above ~1.15 megapixels
IMAGE_HEADER_B64_CHARS = 65_536  # decode this much base64 first; enough for any image header
PDF_PAGE_TOKENS = 1500
PDF_URL_TOKENS = 3000

CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
CACHE_PURGE_EVERY_ENTRIES = 10_000

ECHO_MAX_TOKENS = 12  # answers start with this much of the last user message
FILLER_WORDS = ("ok", "yes", "data", "fake", "text", "word", "more", "sure", "done", "item", "note", "fine")
STREAM_DELTA_CHARS = 24
STREAM_PING_EVERY_DELTAS = 25

HANG_SECONDS = 24 * 3600.0  # far longer than any client timeout
SHUTDOWN_TIMEOUT_SECONDS = 0.1  # stop() cancels handlers still running after this
LISTEN_BACKLOG = 2048  # the processor may open thousands of connections at once
COUNT_TOKENS_REQUESTS_PER_MINUTE = 60_000

BATCH_EXPIRY_SECONDS = 24 * 3600.0
BATCH_CANCEL_SECONDS = 0.2  # time from a cancel request to the end of the batch
BATCH_RESULTS_CHUNK_LINES = 1000
BATCH_CREATE_YIELD_EVERY = 2000  # let other requests run while a large batch is validated
CUSTOM_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Status -> error type of the real API's JSON error body.
ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_MESSAGE_BY_TYPE = {
    "invalid_request_error": "Invalid request (injected by the fake server).",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low to access the Anthropic API.",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "The requested resource could not be found.",
    "conflict_error": "Conflict, please retry.",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of requests has exceeded your rate limit (injected by the fake server).",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}
HTML_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Temporarily Unavailable",
                504: "Gateway Time-out"}

NAMED_FAULTS = frozenset({"drop", "hang", "bad_json", "no_content", "stream_error", "stream_drop"})
IN_STREAM_FAULTS = frozenset({"stream_error", "stream_drop", "bad_json", "no_content"})
# A non-streamed request cannot fail mid-stream; the nearest equivalent answers instead.
NON_STREAM_EQUIVALENT = {"stream_error": "529", "stream_drop": "drop"}
FAULT_MARKER_PATTERN = re.compile(rb"\[\[fault:([A-Za-z0-9_]+)(?:\*(\d+))?\]\]")
SPEND_LIMIT_MARKER = b"[[spend_limit]]"

# Top-level keys the real Messages API accepts; anything else is "Extra inputs are not permitted".
MESSAGE_BODY_KEYS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
    "top_k", "top_p", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers",
    "context_management", "output_config", "output_format",
})

OUTCOME_SUCCEEDED, OUTCOME_ERRORED, OUTCOME_EXPIRED = 0, 1, 2

# ==================================================================================================
# Configuration and statistics
# ==================================================================================================


@dataclass
class ModelLimits:
    """Per-minute limits of one model class; each is also the capacity of its token bucket."""

    requests_per_minute: float = 1_000_000
    input_tokens_per_minute: float = 1_000_000_000
    output_tokens_per_minute: float = 1_000_000_000


@dataclass
class ServerConfig:
    """Behaviour of the fake server. Mutable: changes apply to requests that arrive afterwards.

    limits: per model class (see model_class()); "default" covers every class without an entry.
    latency_seconds: uniform random per request; the wait before a JSON answer, or spread over a stream.
    output_tokens: uniform random per request body (seeded by the body, so a body always gets the same
        answer, streamed or not), then capped by max_tokens.
    fault_rate, fault_kinds: random faults; markers in the request text force faults (module docstring).
    output_accounting: "produced" charges output tokens when produced and admits while the output
        bucket is above 0 (2026 docs); "max_tokens" reserves max_tokens at admission and refunds the
        unused part at the end (2025 docs).
    seed: seeds the answers (read per request) and latency, random faults and ids (read when the server
        is built).
    """

    limits: dict[str, ModelLimits] = field(default_factory=lambda: {DEFAULT_CLASS: ModelLimits()})
    latency_seconds: tuple[float, float] = (0.0, 0.0)
    output_tokens: tuple[int, int] = (20, 20)
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = ("529", "500", "503_html", "drop", "hang", "bad_json")
    api_key: str | None = None
    output_accounting: str = "produced"
    min_cacheable_tokens: int = 1024
    send_ratelimit_headers: bool = True
    retry_after_when_limited: bool = True
    stream_event_interval_seconds: float = 0.0
    batch_processing_seconds: float = 1.0
    batch_error_rate: float = 0.0
    batch_expire_rate: float = 0.0
    seed: int = 0


_TUPLE_FIELDS = {"latency_seconds": float, "output_tokens": int, "fault_kinds": str}


def apply_config_changes(config: ServerConfig, changes: Mapping[str, Any]) -> None:
    """Set ServerConfig fields from plain values (JSON lists for tuples, dicts for limits).

    Raises ValueError for an unknown field or fault kind, leaving the config unchanged.
    """
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    converted: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in known:
            raise ValueError(f"unknown ServerConfig field: {name}")
        if name == "limits":
            value = {cls: limits if isinstance(limits, ModelLimits) else ModelLimits(**limits)
                     for cls, limits in value.items()}
        elif name in _TUPLE_FIELDS:
            value = tuple(_TUPLE_FIELDS[name](item) for item in value)
        converted[name] = value
    for kind in converted.get("fault_kinds", ()):
        if not is_known_fault(kind):
            raise ValueError(f"unknown fault kind: {kind}")
    if converted.get("output_accounting", "produced") not in ("produced", "max_tokens"):
        raise ValueError("output_accounting must be 'produced' or 'max_tokens'")
    for name, value in converted.items():
        setattr(config, name, value)


def config_to_dict(config: ServerConfig) -> dict[str, Any]:
    """The config as JSON-ready data, without the API key (it must never be echoed)."""
    data = dataclasses.asdict(config)
    data["api_key"] = None if config.api_key is None else "<set>"
    return data


@dataclass
class ServerStats:
    """What the server saw. Times are seconds since the server started (time.monotonic based).

    admitted holds (time, 1, input tokens charged, output tokens) per admission, only when the server
    was built with record_timeline=True. request_bodies_by_fingerprint maps body_fingerprint() to the
    number of successful answers for that body, so tests can spot duplicate paid answers.
    """

    requests_received: int = 0
    responses_by_status: dict[int, int] = field(default_factory=dict)
    rate_limited: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    successes: int = 0
    cache_writes: int = 0
    cache_writes_by_prefix: dict[str, int] = field(default_factory=dict)
    cache_reads: int = 0
    api_keys_seen_count: int = 0
    max_in_flight: int = 0
    in_flight: int = 0
    admitted: list[tuple[float, int, int, int]] = field(default_factory=list)
    first_admission_time: float | None = None
    last_completion_time: float | None = None
    request_bodies_by_fingerprint: dict[str, int] = field(default_factory=dict)
    batches_created: int = 0
    input_tokens_charged: int = 0
    output_tokens_charged: int = 0
    count_tokens_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A copy safe to keep while the server goes on counting (int keys stay ints)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in data.items():
            if isinstance(value, (dict, list)):
                data[name] = value.copy()
        return data


def _bump(counter: dict[Any, int], key: Any) -> None:
    counter[key] = counter.get(key, 0) + 1


# ==================================================================================================
# Model classes, fingerprints, ids, JSON helpers
# ==================================================================================================

_MODEL_SUFFIX_PATTERN = re.compile(r"-(?:\d{8}|latest)$")


def model_class(model: str) -> str:
    """The rate-limit class of a model id: the id without a trailing -YYYYMMDD date or -latest.

    claude-sonnet-4-5-20250929 and claude-sonnet-4-5 share the class claude-sonnet-4-5.
    """
    return _MODEL_SUFFIX_PATTERN.sub("", model)


def canonical_json(value: Any) -> bytes:
    """Key-sorted, compact, UTF-8 JSON: equal data gives equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def body_fingerprint(body: Any) -> str:
    """sha256 hex of canonical_json(body): the identity of a request body in stats and fault counters."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _rfc3339(unix_seconds: float, *, fraction: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(unix_seconds, tz=datetime.timezone.utc)
    if fraction:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ==================================================================================================
# The fake tokenizer
# ==================================================================================================

# Words and single punctuation marks. A word of up to 4 characters is one token, longer words cost
# ceil(len / 4); cl100k gives most English words one token, so this counts ~1.3x as many.
_TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
_PDF_PAGE_PATTERN = re.compile(rb"/Type\s*/Page(?![A-Za-z])")


class RequestError(Exception):
    """A request the real API would refuse: status, error type and message of the JSON error."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_request_error", message)


def count_text_tokens(text: str) -> int:
    """Tokens of a text under the fake Claude tokenizer."""
    return sum((len(piece) + 3) >> 2 for piece in _TOKEN_PATTERN.findall(text))


def image_tokens(width: int, height: int) -> int:
    """Tokens of an image: scaled so the long edge is at most 1568 px, then w*h/750, capped at 1600."""
    scale = min(1.0, IMAGE_MAX_LONG_EDGE / max(width, height, 1))
    return min(IMAGE_MAX_TOKENS, math.ceil(width * scale * height * scale / 750))


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, GIF, WebP or JPEG header, or None when not recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                    int.from_bytes(data[28:30], "little") & 0x3FFF)
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        return None
    if data[:2] == b"\xff\xd8":
        return _jpeg_dimensions(data)
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG segments to the first start-of-frame marker, which holds the size."""
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            position += 1
            continue
        marker = data[position + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD9:  # fill byte or marker without length
            position += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            return width, height
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def _b64decode(text: Any) -> bytes:
    if not isinstance(text, str):
        return b""
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError):
        return b""


def _image_block_tokens(block: Mapping[str, Any]) -> int:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _invalid("image.source: Field required")
    if source.get("type") != "base64":
        return IMAGE_URL_TOKENS
    data = source.get("data")
    if not isinstance(data, str):
        raise _invalid("image.source.data: Field required")
    # Most images reveal their size in the first bytes; decode everything only when that fails.
    head = data[:IMAGE_HEADER_B64_CHARS]
    dimensions = image_dimensions(_b64decode(head))
    if dimensions is None and len(data) > len(head):
        dimensions = image_dimensions(_b64decode(data))
    if dimensions is None:
        raise _invalid("Could not process image")
    return image_tokens(*dimensions)


def _document_block_tokens(block: Mapping[str, Any]) -> int:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    tokens = count_text_tokens(str(block.get("title") or "")) + count_text_tokens(str(block.get("context") or ""))
    kind = source.get("type")
    if kind == "base64":
        pdf = _b64decode(source.get("data"))
        if not pdf.startswith(b"%PDF"):
            raise _invalid("The PDF specified was not valid.")
        return tokens + PDF_PAGE_TOKENS * max(1, len(_PDF_PAGE_PATTERN.findall(pdf)))
    if kind == "text":
        return tokens + count_text_tokens(str(source.get("data", "")))
    if kind == "content":
        return tokens + _content_tokens(source.get("content", []))
    return tokens + PDF_URL_TOKENS


def _block_tokens(block: Mapping[str, Any]) -> int:
    kind = block.get("type")
    if kind == "text":
        return count_text_tokens(block["text"])
    if kind == "image":
        return _image_block_tokens(block)
    if kind == "document":
        return _document_block_tokens(block)
    if kind in ("tool_use", "server_tool_use"):
        return (count_text_tokens(str(block.get("name", "")))
                + count_text_tokens(_dumps(block.get("input", {})).decode()))
    if kind == "tool_result":
        return _content_tokens(block.get("content", ""))
    if kind == "thinking":
        return count_text_tokens(str(block.get("thinking", "")))
    if kind == "redacted_thinking":
        return count_text_tokens(str(block.get("data", "")))
    return count_text_tokens(_dumps(block).decode())


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return count_text_tokens(content)
    if isinstance(content, list):
        return sum(_block_tokens(block) for block in content if isinstance(block, dict))
    return 0


def _tool_tokens(tool: Mapping[str, Any]) -> int:
    return (count_text_tokens(str(tool.get("name", ""))) + count_text_tokens(str(tool.get("description", "")))
            + count_text_tokens(_dumps(tool.get("input_schema", {})).decode()))


# One part of the input, in cache-prefix order: (tokens, identity for the cache key, cache_control).
_InputPart = tuple[int, Any, Any]


def _input_parts(body: Mapping[str, Any]) -> list[_InputPart]:
    """The request's input in prefix order (tools, system, messages), one part per block."""
    tools = body.get("tools") or []
    parts: list[_InputPart] = [(REQUEST_OVERHEAD_TOKENS + (TOOLS_OVERHEAD_TOKENS if tools else 0), None, None)]
    for tool in tools:
        parts.append((_tool_tokens(tool), ("tool", tool), tool.get("cache_control")))
    system = body.get("system")
    if isinstance(system, str) and system:
        parts.append((count_text_tokens(system), ("system", system), None))
    elif isinstance(system, list):
        for block in system:
            parts.append((_block_tokens(block), ("system", block), block.get("cache_control")))
    for message in body["messages"]:
        role, content = message["role"], message["content"]
        if isinstance(content, str):
            parts.append((MESSAGE_OVERHEAD_TOKENS + count_text_tokens(content), (role, 0, content), None))
            continue
        for position, block in enumerate(content):
            overhead = MESSAGE_OVERHEAD_TOKENS if position == 0 else 0
            parts.append((overhead + _block_tokens(block), (role, position, block), block.get("cache_control")))
    return parts


def count_input_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a valid Messages body under the fake tokenizer (what usage would report)."""
    return sum(part[0] for part in _input_parts(body))


@dataclass(frozen=True)
class CacheBreakpoint:
    """The prefix ending at one cache_control: its tokens, cache key and TTL ("5m" or "1h")."""

    prefix_tokens: int
    key: str
    ttl: str


def _cache_identity(item: Any) -> bytes:
    """The bytes a part contributes to a cache key; cache_control itself does not change the content."""
    *labels, payload = item
    if isinstance(payload, dict) and "cache_control" in payload:
        payload = {k: v for k, v in payload.items() if k != "cache_control"}
    return canonical_json([*labels, payload])


def analyze_input(body: Mapping[str, Any], model_class_name: str) -> tuple[int, list[CacheBreakpoint]]:
    """Total input tokens and the cache breakpoints (in order) of a valid Messages body."""
    parts = _input_parts(body)
    total = sum(part[0] for part in parts)
    if not any(part[2] for part in parts):
        return total, []
    digest = hashlib.sha256(model_class_name.encode())
    breakpoints: list[CacheBreakpoint] = []
    cumulative = 0
    for tokens, item, cache_control in parts:
        cumulative += tokens
        if item is not None:
            digest.update(_cache_identity(item))
            digest.update(b"\n")
        if cache_control:
            if not isinstance(cache_control, dict) or cache_control.get("type") != "ephemeral":
                raise _invalid("cache_control.type: Input should be 'ephemeral'")
            ttl = cache_control.get("ttl", "5m")
            if ttl not in CACHE_TTL_SECONDS:
                raise _invalid("cache_control.ttl: Input should be '5m' or '1h'")
            breakpoints.append(CacheBreakpoint(cumulative, digest.hexdigest(), ttl))
    if len(breakpoints) > MAX_CACHE_BREAKPOINTS:
        raise _invalid(f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
                       f"Found {len(breakpoints)}.")
    return total, breakpoints


# ==================================================================================================
# Validation
# ==================================================================================================


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or RequestError 400 as the real API answers."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _invalid("There was an error parsing the body of your request. The body must be valid JSON.") from None
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_blocks(blocks: Any, where: str) -> None:
    for position, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _invalid(f"{where}.{position}.type: Field required")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise _invalid(f"{where}.{position}.text: Input should be a valid string")


def validate_message_body(body: Mapping[str, Any], *, for_count_tokens: bool = False) -> None:
    """Raise RequestError for a body the real Messages API would refuse.

    count_tokens bodies need no max_tokens and are not checked for extra keys (the fake stays lenient
    where the real endpoint's rules are not documented).
    """
    if not for_count_tokens:
        for key in body:
            if key not in MESSAGE_BODY_KEYS:
                raise _invalid(f"{key}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model: Field required" if model is None else "model: Input should be a valid string")
    if not for_count_tokens:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise _invalid("max_tokens: Field required")
        if not _is_int(max_tokens) or max_tokens < 1:
            raise _invalid("max_tokens: Input should be a positive integer")
        if max_tokens > MAX_OUTPUT_TOKENS:
            raise _invalid(f"max_tokens: {max_tokens} > {MAX_OUTPUT_TOKENS}, which is the maximum allowed "
                           f"number of output tokens for {model}")
    messages = body.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: Input should be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _invalid(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, list):
            _validate_blocks(content, f"messages.{index}.content")
        elif not isinstance(content, str):
            raise _invalid(f"messages.{index}.content: Input should be a valid string or list")
    system = body.get("system")
    if isinstance(system, list):
        _validate_blocks(system, "system")
        if any(block["type"] != "text" for block in system):
            raise _invalid("system: only text blocks are allowed")
    elif system is not None and not isinstance(system, str):
        raise _invalid("system: Input should be a valid string or list of text blocks")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _invalid("metadata: Input should be a valid dictionary")
        for key in metadata:
            if key != "user_id":
                raise _invalid(f"metadata.{key}: Extra inputs are not permitted")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _invalid("stream: Input should be a valid boolean")
    for name in ("temperature", "top_p"):
        if name in body and (not _is_number(body[name]) or not 0 <= body[name] <= 1):
            raise _invalid(f"{name}: Input should be a number between 0 and 1")
    if "top_k" in body and (not _is_int(body["top_k"]) or body["top_k"] < 0):
        raise _invalid("top_k: Input should be a non-negative integer")
    stop_sequences = body.get("stop_sequences")
    if stop_sequences is not None and (not isinstance(stop_sequences, list)
                                       or not all(isinstance(s, str) for s in stop_sequences)):
        raise _invalid("stop_sequences: Input should be a list of strings")
    _validate_tools(body)
    _validate_thinking(body, for_count_tokens)


def _validate_tools(body: Mapping[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid("tools: Input should be a valid list")
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise _invalid(f"tools.{index}.name: Field required")
            if tool.get("type", "custom") == "custom" and not isinstance(tool.get("input_schema"), dict):
                raise _invalid(f"tools.{index}.custom.input_schema: Field required")
    tool_choice = body.get("tool_choice")
    if tool_choice is None:
        return
    if not isinstance(tool_choice, dict) or tool_choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if tool_choice["type"] in ("any", "tool") and not tools:
        raise _invalid("tool_choice may only be specified while providing tools.")
    if tool_choice["type"] == "tool" and not any(tool["name"] == tool_choice.get("name") for tool in tools):
        raise _invalid(f"Tool '{tool_choice.get('name')}' not found in the provided tools")


def _validate_thinking(body: Mapping[str, Any], for_count_tokens: bool) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise _invalid("thinking.type: Input should be 'enabled' or 'disabled'")
    if thinking["type"] != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if not _is_int(budget) or budget < 1024:
        raise _invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
    if not for_count_tokens and budget >= body["max_tokens"]:
        raise _invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")


# ==================================================================================================
# Fault markers
# ==================================================================================================


def is_known_fault(kind: str) -> bool:
    """A status ("529"), an HTML status ("503_html") or one of the named faults."""
    if kind in NAMED_FAULTS:
        return True
    status = kind[:-5] if kind.endswith("_html") else kind
    return status.isdigit() and 100 <= int(status) <= 599


def find_fault_marker(raw: bytes) -> tuple[str, int | None] | None:
    """(code, attempts or None) of the first [[fault:CODE]] / [[fault:CODE*N]] in the raw body."""
    match = FAULT_MARKER_PATTERN.search(raw)
    if match is None:
        return None
    return match.group(1).decode(), int(match.group(2)) if match.group(2) else None


def _fault_error_type(kind: str) -> str:
    """The JSON error type a batch item gets for a fault marker."""
    if kind.isdigit():
        return ERROR_TYPE_BY_STATUS.get(int(kind), "api_error" if int(kind) >= 500 else "invalid_request_error")
    return "api_error"


# ==================================================================================================
# Generated answers and SSE events
# ==================================================================================================


@dataclass
class Answer:
    """What the fake model produced: content blocks, their output tokens and the stop reason."""

    content: list[dict[str, Any]]
    output_tokens: int
    stop_reason: str


def _filler(rng: random.Random, tokens: int) -> str:
    """Exactly `tokens` tokens: every filler word is one token."""
    return " ".join(rng.choices(FILLER_WORDS, k=tokens)) if tokens > 0 else ""


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message["role"] != "user":
            continue
        content = message["content"]
        if isinstance(content, str):
            return content
        return next((block["text"] for block in content if block.get("type") == "text"), "")
    return ""


def _truncate_to_tokens(text: str, limit: int) -> tuple[str, int]:
    """The longest prefix of text with at most `limit` tokens (whitespace collapsed) and its tokens."""
    used = end = 0
    for match in _TOKEN_PATTERN.finditer(text):
        tokens = (match.end() - match.start() + 3) >> 2
        if used + tokens > limit:
            break
        used += tokens
        end = match.end()
    # Collapsing whitespace keeps every token intact, because tokens never contain whitespace.
    return " ".join(text[:end].split()), used


def _example_value(schema: Mapping[str, Any], rng: random.Random) -> Any:
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "string":
        return ""
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return rng.randint(0, 1000) / 10
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return None


def _tool_use_tokens(block: Mapping[str, Any]) -> int:
    return count_text_tokens(block["name"]) + count_text_tokens(_dumps(block["input"]).decode())


def _tool_use_block(tool: Mapping[str, Any], target_tokens: int, rng: random.Random) -> dict[str, Any]:
    """A tool call whose input follows the tool's schema, padded to target_tokens when it has a string field."""
    properties = (tool.get("input_schema") or {}).get("properties") or {}
    tool_input = {name: _example_value(prop, rng) for name, prop in properties.items() if isinstance(prop, dict)}
    block = {"type": "tool_use", "id": f"toolu_{rng.getrandbits(96):024x}", "name": tool["name"], "input": tool_input}
    pad_field = next((name for name, value in tool_input.items() if value == ""), None)
    missing = target_tokens - _tool_use_tokens(block)
    if pad_field is not None and missing > 0:
        tool_input[pad_field] = _filler(rng, missing)  # each word adds exactly one token inside the quotes
    return block


def _forced_tool(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    tool_choice = body.get("tool_choice")
    tools = body.get("tools") or []
    if not isinstance(tool_choice, dict) or not tools:
        return None
    if tool_choice.get("type") == "tool":
        return next(tool for tool in tools if tool["name"] == tool_choice.get("name"))
    if tool_choice.get("type") == "any":
        return tools[0]
    return None


def generate_answer(body: Mapping[str, Any], seed: int, output_tokens: tuple[int, int]) -> Answer:
    """The fake model's answer: deterministic for a body and seed, exactly output_tokens tokens long.

    Text answers start with an echo of the last user message so results are recognisable; a thinking
    block comes first when thinking is enabled; a forced tool_choice gives a tool_use block.
    """
    rng = random.Random(seed)
    wanted = rng.randint(*output_tokens)
    max_tokens = body["max_tokens"]
    produced = min(wanted, max_tokens)
    stop_reason = "max_tokens" if wanted >= max_tokens else "end_turn"
    tool = _forced_tool(body)
    if tool is not None:
        block = _tool_use_block(tool, produced, rng)
        return Answer([block], _tool_use_tokens(block), "tool_use")
    content: list[dict[str, Any]] = []
    text_tokens = produced
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        thinking_tokens = produced // 3
        text_tokens -= thinking_tokens
        signature = base64.b64encode(rng.getrandbits(256).to_bytes(32, "big")).decode()
        content.append({"type": "thinking", "thinking": _filler(rng, thinking_tokens), "signature": signature})
    echo, echo_tokens = _truncate_to_tokens(_last_user_text(body["messages"]), min(text_tokens, ECHO_MAX_TOKENS))
    text = " ".join(part for part in (echo, _filler(rng, text_tokens - echo_tokens)) if part)
    content.append({"type": "text", "text": text})
    return Answer(content, produced, stop_reason)


def build_usage(input_tokens: int, cache_write_tokens: int, cache_read_tokens: int, write_ttl: str,
                output_tokens: int) -> dict[str, Any]:
    """The usage object of a message, with the cache write split by TTL."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write_tokens,
        "cache_read_input_tokens": cache_read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache_write_tokens if write_ttl == "5m" else 0,
            "ephemeral_1h_input_tokens": cache_write_tokens if write_ttl == "1h" else 0,
        },
        "output_tokens": output_tokens,
    }


def build_message(message_id: str, model: str, answer: Answer, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": answer.content,
            "stop_reason": answer.stop_reason, "stop_sequence": None, "usage": usage}


def _chunks(text: str) -> list[str]:
    return [text[i:i + STREAM_DELTA_CHARS] for i in range(0, len(text), STREAM_DELTA_CHARS)]


def _block_start_and_deltas(block: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The content_block_start payload of a block and the deltas that rebuild it."""
    if block["type"] == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": chunk} for chunk in _chunks(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
        return {"type": "thinking", "thinking": "", "signature": ""}, deltas
    if block["type"] == "tool_use":
        deltas = [{"type": "input_json_delta", "partial_json": chunk}
                  for chunk in _chunks(_dumps(block["input"]).decode())]
        return {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}, deltas
    return {"type": "text", "text": ""}, [{"type": "text_delta", "text": chunk} for chunk in _chunks(block["text"])]


def stream_events(message: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events (name, data) that stream `message`, in the real API's order."""
    start_usage = {**message["usage"], "output_tokens": 1}
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start}),
                                                ("ping", {"type": "ping"})]
    deltas_sent = 0
    for index, block in enumerate(message["content"]):
        start_block, deltas = _block_start_and_deltas(block)
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": start_block}))
        for delta in deltas:
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
            deltas_sent += 1
            if deltas_sent % STREAM_PING_EVERY_DELTAS == 0:
                events.append(("ping", {"type": "ping"}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": message["stop_reason"],
                                               "stop_sequence": message["stop_sequence"]},
                                     "usage": {"output_tokens": message["usage"]["output_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def encode_sse(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


# ==================================================================================================
# Token buckets
# ==================================================================================================


class TokenBucket:
    """A bucket of `capacity` that refills continuously at capacity/60 per second and starts full.

    Levels may go negative when output is charged after the fact; callers pass the time in.
    """

    __slots__ = ("capacity", "level", "rate_per_second", "updated")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate_per_second = max(self.capacity, 1e-9) / 60.0
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_second)
            self.updated = now

    def set_capacity(self, capacity: float, now: float) -> None:
        """Change the limit. What was used recently still counts, now against the new capacity."""
        self.refill(now)
        used = self.capacity - self.level
        self.capacity = float(capacity)
        self.rate_per_second = max(self.capacity, 1e-9) / 60.0
        self.level = self.capacity - used

    def seconds_until(self, amount: float) -> float:
        """Seconds until the (refilled) bucket holds `amount`; amounts above capacity wait for a full bucket."""
        missing = min(amount, self.capacity) - self.level
        return max(0.0, missing / self.rate_per_second)

    def seconds_until_positive(self) -> float:
        return 0.0 if self.level > 0 else (1e-6 - self.level) / self.rate_per_second

    def seconds_until_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate_per_second)


_LIMIT_NAMES = {"requests": "requests", "input-tokens": "input tokens", "output-tokens": "output tokens"}


class Admission:
    """An admitted request's claim on the output bucket, settled once with the tokens produced."""

    __slots__ = ("_limiter", "_reserved", "settled_tokens")

    def __init__(self, limiter: ModelLimiter, reserved: int) -> None:
        self._limiter = limiter
        self._reserved = reserved
        self.settled_tokens: int | None = None

    def settle(self, produced_tokens: int, now: float) -> None:
        """Charge produced output (refunding a max_tokens reservation); later calls do nothing."""
        if self.settled_tokens is None:
            self.settled_tokens = produced_tokens
            self._limiter.output_tokens.refill(now)
            self._limiter.output_tokens.level -= produced_tokens - self._reserved


class ModelLimiter:
    """The three buckets of one model class and the anthropic-ratelimit-* headers they imply."""

    def __init__(self, model_class_name: str, limits: ModelLimits, now: float) -> None:
        self.model_class_name = model_class_name
        self.requests = TokenBucket(limits.requests_per_minute, now)
        self.input_tokens = TokenBucket(limits.input_tokens_per_minute, now)
        self.output_tokens = TokenBucket(limits.output_tokens_per_minute, now)
        self._limits_seen = (limits.requests_per_minute, limits.input_tokens_per_minute,
                             limits.output_tokens_per_minute)

    def _buckets(self) -> dict[str, TokenBucket]:
        return {"requests": self.requests, "input-tokens": self.input_tokens, "output-tokens": self.output_tokens}

    def apply_limits(self, limits: ModelLimits, now: float) -> None:
        """Follow config changes; cheap when nothing changed, so it runs on every request."""
        wanted = (limits.requests_per_minute, limits.input_tokens_per_minute, limits.output_tokens_per_minute)
        if wanted != self._limits_seen:
            self._limits_seen = wanted
            for bucket, capacity in zip((self.requests, self.input_tokens, self.output_tokens), wanted):
                bucket.set_capacity(capacity, now)

    def admit(self, input_charge: int, reserve_output: int, output_accounting: str,
              now: float) -> Admission | tuple[str, float]:
        """Admit and charge a request, or return (binding limit, seconds until it would be admitted)."""
        for bucket in (self.requests, self.input_tokens, self.output_tokens):
            bucket.refill(now)
        if output_accounting == "max_tokens":
            output_wait = self.output_tokens.seconds_until(reserve_output)
        else:
            output_wait = self.output_tokens.seconds_until_positive()
        waits = {"requests": self.requests.seconds_until(1),
                 "input-tokens": self.input_tokens.seconds_until(input_charge), "output-tokens": output_wait}
        binding = max(waits, key=waits.__getitem__)
        if waits[binding] > 0:
            return binding, waits[binding]
        self.requests.level -= 1
        self.input_tokens.level -= input_charge
        reserved = reserve_output if output_accounting == "max_tokens" else 0
        self.output_tokens.level -= reserved
        return Admission(self, reserved)

    def limit_message(self, binding: str) -> str:
        bucket = self._buckets()[binding]
        return (f"This request would exceed your organization's rate limit of {int(bucket.capacity):,} "
                f"{_LIMIT_NAMES[binding]} per minute (model: {self.model_class_name}). For details, refer to: "
                "https://docs.claude.com/en/api/rate-limits. You can see the response headers for current "
                "usage. Please reduce the prompt length or the maximum tokens requested, or try again later.")

    def headers(self, now: float, wall_now: float) -> dict[str, str]:
        """anthropic-ratelimit-* headers; token remaining is rounded down to a multiple of 1000 above 1000."""
        headers: dict[str, str] = {}
        remaining_by_name: dict[str, int] = {}
        for name, bucket in self._buckets().items():
            bucket.refill(now)
            remaining = max(0, math.floor(bucket.level))
            if name != "requests" and remaining >= 1000:
                remaining -= remaining % 1000
            remaining_by_name[name] = remaining
            headers[f"anthropic-ratelimit-{name}-limit"] = str(int(bucket.capacity))
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
            headers[f"anthropic-ratelimit-{name}-reset"] = _rfc3339(math.ceil(wall_now + bucket.seconds_until_full()))
        tightest = min(("input-tokens", "output-tokens"), key=remaining_by_name.__getitem__)
        for suffix in ("limit", "remaining", "reset"):
            headers[f"anthropic-ratelimit-tokens-{suffix}"] = headers[f"anthropic-ratelimit-{tightest}-{suffix}"]
        return headers


# ==================================================================================================
# Prompt cache
# ==================================================================================================


@dataclass(frozen=True)
class CachePlan:
    """How a request uses the cache: tokens read and written, and which entries it touches."""

    read_tokens: int = 0
    write_tokens: int = 0
    write_ttl: str = "5m"
    read_key: str | None = None
    write_key: str | None = None


NO_CACHE = CachePlan()


class PromptCache:
    """Cache entries (key -> expiry, TTL). An entry exists only once the response that wrote it began."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, float]] = {}
        self._size_at_last_purge = 0

    def plan(self, breakpoints: Sequence[CacheBreakpoint], min_tokens: int, now: float) -> CachePlan:
        """Read the longest live prefix, write from there to the last breakpoint. Changes nothing."""
        last = breakpoints[-1] if breakpoints else None
        if last is None or last.prefix_tokens < min_tokens:
            return NO_CACHE
        for breakpoint in reversed(breakpoints):
            if breakpoint.prefix_tokens < min_tokens:
                break
            entry = self._entries.get(breakpoint.key)
            if entry is not None and entry[0] > now:
                if breakpoint is last:
                    return CachePlan(read_tokens=last.prefix_tokens, read_key=last.key)
                return CachePlan(read_tokens=breakpoint.prefix_tokens, read_key=breakpoint.key,
                                 write_tokens=last.prefix_tokens - breakpoint.prefix_tokens,
                                 write_ttl=last.ttl, write_key=last.key)
        return CachePlan(write_tokens=last.prefix_tokens, write_ttl=last.ttl, write_key=last.key)

    def refresh(self, key: str, now: float) -> None:
        """A read extends the entry's life by its TTL."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (now + entry[1], entry[1])

    def store(self, key: str, ttl: str, now: float) -> None:
        """Make an entry readable (called when the writing response begins)."""
        old = self._entries.get(key)
        # Two writers of one prefix with different TTLs: the longer TTL wins.
        ttl_seconds = max(CACHE_TTL_SECONDS[ttl], old[1] if old else 0.0)
        self._entries[key] = (now + ttl_seconds, ttl_seconds)
        if len(self._entries) - self._size_at_last_purge >= CACHE_PURGE_EVERY_ENTRIES:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            self._size_at_last_purge = len(self._entries)


# ==================================================================================================
# Message Batches
# ==================================================================================================


class Batch:
    """One message batch, stored compactly: canonical params bytes, input tokens and outcome per item.

    Items are processed in submission order at a constant rate over batch_processing_seconds; results are
    generated when read. A cancel freezes the processed count and ends the batch shortly after.
    """

    def __init__(self, batch_id: str, duration: float, seed: int) -> None:
        self.id = batch_id
        self.duration = duration
        self.seed = seed
        self.created = self.wall_created = self.ends = 0.0  # set by start() once all items are stored
        self.custom_ids: list[str] = []
        self.params: list[bytes] = []
        self.input_tokens = array("I")
        self.outcomes = bytearray()
        self.errors: dict[int, tuple[str, str]] = {}  # item -> (error type, message), when not a random api_error
        self.cancel_initiated: float | None = None
        self.processed_at_cancel: int | None = None

    def start(self, now: float, wall_now: float) -> None:
        """Processing starts once the batch is stored, so a new batch reports every item processing."""
        self.created = now
        self.wall_created = wall_now
        self.ends = now + self.duration

    def _wall(self, moment: float) -> float:
        return self.wall_created + (moment - self.created)

    def processed(self, now: float) -> int:
        if self.processed_at_cancel is not None:
            return self.processed_at_cancel
        total = len(self.custom_ids)
        if self.duration <= 0 or now >= self.ends:
            return total
        return min(total, int(total * (now - self.created) / self.duration))

    def status(self, now: float) -> str:
        if now >= self.ends:
            return "ended"
        return "in_progress" if self.cancel_initiated is None else "canceling"

    def cancel(self, now: float) -> None:
        if self.status(now) == "in_progress":
            self.processed_at_cancel = self.processed(now)
            self.cancel_initiated = now
            self.ends = min(self.ends, now + BATCH_CANCEL_SECONDS)

    def to_json(self, now: float, base_url: str) -> dict[str, Any]:
        status = self.status(now)
        processed = self.processed(now)
        done = self.outcomes[:processed]
        unprocessed = len(self.custom_ids) - processed
        counts = {"processing": 0 if status == "ended" else unprocessed,
                  "succeeded": done.count(OUTCOME_SUCCEEDED), "errored": done.count(OUTCOME_ERRORED),
                  "canceled": unprocessed if status == "ended" else 0, "expired": done.count(OUTCOME_EXPIRED)}
        ended = status == "ended"
        return {
            "id": self.id, "type": "message_batch", "processing_status": status, "request_counts": counts,
            "ended_at": _rfc3339(self._wall(self.ends), fraction=True) if ended else None,
            "created_at": _rfc3339(self.wall_created, fraction=True),
            "expires_at": _rfc3339(self.wall_created + BATCH_EXPIRY_SECONDS, fraction=True),
            "cancel_initiated_at": (None if self.cancel_initiated is None
                                    else _rfc3339(self._wall(self.cancel_initiated), fraction=True)),
            "archived_at": None,
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }


# ==================================================================================================
# The HTTP server
# ==================================================================================================


def _too_large_response() -> web.Response:
    """The edge proxy's 413: plain text, not the API's JSON, and the connection is closed."""
    response = web.Response(status=413, text="413 Request Entity Too Large", content_type="text/plain")
    response.force_close()
    return response


def _html_response(status: int) -> web.Response:
    reason = HTML_REASONS.get(status, "Error")
    page = (f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
            f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n")
    return web.Response(status=status, text=page, content_type="text/html")


class FakeAnthropicServer:
    """The fake API as an aiohttp application. `config` may be changed while it runs.

    start(host, port) returns the base URL; stop() closes it, cancelling handlers still running (a
    hanging request never delays it by more than a fraction of a second).
    """

    def __init__(self, config: ServerConfig | None = None, *, record_timeline: bool = False) -> None:
        self.config = config if config is not None else ServerConfig()
        self.stats = ServerStats()
        self.record_timeline = record_timeline
        self.base_url: str | None = None
        self._rng = random.Random(self.config.seed)
        self._limiters: dict[str, ModelLimiter] = {}
        self._count_tokens_bucket = TokenBucket(COUNT_TOKENS_REQUESTS_PER_MINUTE, time.monotonic())
        self._cache = PromptCache()
        self._fault_attempts: dict[str, int] = {}
        self._api_key_digests: set[bytes] = set()
        self._batches: dict[str, Batch] = {}
        self._runner: web.AppRunner | None = None
        self._started = time.monotonic()
        self.app = self._build_app()

    # ---- lifecycle ------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BATCH_BODY_BYTES + 1024 * 1024)
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_post("/v1/messages/count_tokens", self._handle_count_tokens)
        app.router.add_post("/v1/messages/batches", self._handle_batch_create)
        app.router.add_get("/v1/messages/batches", self._handle_batch_list)
        app.router.add_get("/v1/messages/batches/{batch_id}", self._handle_batch_get)
        app.router.add_delete("/v1/messages/batches/{batch_id}", self._handle_batch_delete)
        app.router.add_get("/v1/messages/batches/{batch_id}/results", self._handle_batch_results)
        app.router.add_post("/v1/messages/batches/{batch_id}/cancel", self._handle_batch_cancel)
        app.router.add_get("/__stats", self._handle_stats)
        app.router.add_get("/__config", self._handle_config_get)
        app.router.add_post("/__config", self._handle_config_post)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 picks a free port) and return the base URL, e.g. http://127.0.0.1:PORT."""
        # handler_cancellation: a client that gives up on a hanging request frees its handler.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=LISTEN_BACKLOG).start()
        bound_port = self._runner.addresses[0][1]
        shown_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        self._started = time.monotonic()
        self.base_url = f"http://{shown_host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ---- shared helpers -------------------------------------------------------------------------

    def _since_start(self, now: float) -> float:
        return now - self._started

    def _limiter(self, class_name: str, now: float) -> ModelLimiter:
        limits = self.config.limits.get(class_name) or self.config.limits.get(DEFAULT_CLASS) or ModelLimits()
        limiter = self._limiters.get(class_name)
        if limiter is None:
            limiter = self._limiters[class_name] = ModelLimiter(class_name, limits, now)
        else:
            limiter.apply_limits(limits, now)
        return limiter

    def _ratelimit_headers(self, limiter: ModelLimiter, now: float) -> dict[str, str]:
        if not self.config.send_ratelimit_headers:
            return {}
        return limiter.headers(now, time.time())

    @staticmethod
    def _error(status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None,
               details: Mapping[str, Any] | None = None) -> web.Response:
        request_id = _new_id("req_")
        error: dict[str, Any] = {"type": error_type, "message": message}
        if details:
            error["details"] = dict(details)
        all_headers = {"request-id": request_id, **(headers or {})}
        if status >= 500:
            all_headers["x-should-retry"] = "true"
        return web.Response(status=status, body=_dumps({"type": "error", "error": error, "request_id": request_id}),
                            content_type="application/json", headers=all_headers)

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """401 for a missing or wrong x-api-key. Keys are only counted (by digest), never stored or shown."""
        api_key = request.headers.get("x-api-key", "")
        if not api_key:
            return self._error(401, "authentication_error", "x-api-key header is required")
        digest = hashlib.sha256(api_key.encode()).digest()
        if digest not in self._api_key_digests:
            self._api_key_digests.add(digest)
            self.stats.api_keys_seen_count = len(self._api_key_digests)
        if self.config.api_key is not None and api_key != self.config.api_key:
            return self._error(401, "authentication_error", "invalid x-api-key")
        return None

    def _check_headers(self, request: web.Request, now: float) -> web.Response | None:
        """Authentication, then anthropic-version; the version error already carries rate-limit headers."""
        denied = self._authenticate(request)
        if denied is not None:
            return denied
        if not request.headers.get("anthropic-version"):
            return self._error(400, "invalid_request_error", "anthropic-version: header is required",
                               self._ratelimit_headers(self._limiter(DEFAULT_CLASS, now), now))
        return None

    # ---- POST /v1/messages ----------------------------------------------------------------------

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests_received += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            response = await self._serve_message(request)
        finally:
            stats.in_flight -= 1
        if response is None:  # the connection was dropped on purpose; nothing was sent
            return web.Response()
        _bump(stats.responses_by_status, response.status)
        if response.status == 429:
            stats.rate_limited += 1
        return response

    def _choose_fault(self, raw: bytes, fingerprint: str, stream: bool) -> str | None:
        """The fault this attempt gets: a marker first, else a random fault at config.fault_rate."""
        kind: str | None = None
        marker = find_fault_marker(raw) if b"[[fault:" in raw else None
        if marker is not None:
            kind, attempts = marker
            if attempts is not None:
                self._fault_attempts[fingerprint] = seen = self._fault_attempts.get(fingerprint, 0) + 1
                if seen > attempts:
                    kind = None
        elif self.config.fault_rate > 0 and self._rng.random() < self.config.fault_rate:
            kind = self._rng.choice(self.config.fault_kinds)
        if kind is not None and not stream:
            kind = NON_STREAM_EQUIVALENT.get(kind, kind)
        return kind

    async def _serve_message(self, request: web.Request) -> web.StreamResponse | None:
        """One Messages request, in the real service's order: edge, auth, validation, faults, limits."""
        config = self.config
        if (request.content_length or 0) > MAX_MESSAGE_BODY_BYTES:
            return _too_large_response()
        now = time.monotonic()
        rejected = self._check_headers(request, now)
        if rejected is not None:
            return rejected
        raw = await request.read()
        if len(raw) > MAX_MESSAGE_BODY_BYTES:
            return _too_large_response()
        class_name = DEFAULT_CLASS
        try:
            body = parse_json_object(raw)
            if isinstance(body.get("model"), str):
                class_name = model_class(body["model"])
            validate_message_body(body)
            total_tokens, breakpoints = analyze_input(body, class_name)
            if body["model"] == NONEXISTENT_MODEL:
                raise RequestError(404, "not_found_error", f"model: {body['model']}")
        except RequestError as error:
            limiter = self._limiter(class_name, now)
            return self._error(error.status, error.error_type, error.message, self._ratelimit_headers(limiter, now))
        limiter = self._limiter(class_name, now)

        if SPEND_LIMIT_MARKER in raw:
            return self._error(429, "rate_limit_error",
                               "You have reached your specified API usage limits. You will regain access on the "
                               "first of next month.", self._ratelimit_headers(limiter, now),
                               details={"error_code": "enforced_spend_limit_reached"})

        # The same request streamed or not is the same request (for fault counts and paid answers).
        fingerprint = body_fingerprint({k: v for k, v in body.items() if k != "stream"})
        stream = body.get("stream") is True
        fault = self._choose_fault(raw, fingerprint, stream)
        if fault is not None:
            _bump(self.stats.faults_injected, fault)
            if not (stream and fault in IN_STREAM_FAULTS):
                return await self._answer_fault(request, fault, body, fingerprint, total_tokens, limiter)

        cache_plan = self._cache.plan(breakpoints, config.min_cacheable_tokens, now) if breakpoints else NO_CACHE
        input_charge = total_tokens - cache_plan.read_tokens
        reserve = body["max_tokens"] if config.output_accounting == "max_tokens" else 0
        admission = limiter.admit(input_charge, reserve, config.output_accounting, now)
        if not isinstance(admission, Admission):
            binding, wait_seconds = admission
            headers = self._ratelimit_headers(limiter, now)
            if config.retry_after_when_limited:
                headers["retry-after"] = str(max(1, math.ceil(wait_seconds)))
            return self._error(429, "rate_limit_error", limiter.limit_message(binding), headers)

        if cache_plan.read_key is not None:
            self._cache.refresh(cache_plan.read_key, now)
        message = self._message_for(body, fingerprint, total_tokens, cache_plan)
        output_tokens = message["usage"]["output_tokens"]
        self._record_admission(now, input_charge, output_tokens)
        latency = self._rng.uniform(*config.latency_seconds) if config.latency_seconds[1] > 0 else 0.0
        try:
            if stream:
                response, completed = await self._send_stream(request, message, latency, fault, limiter, admission,
                                                              cache_plan)
            else:
                if latency > 0:
                    await asyncio.sleep(latency)
                self._response_began(cache_plan)
                admission.settle(output_tokens, time.monotonic())
                response = web.Response(body=_dumps(message), content_type="application/json",
                                        headers={"request-id": _new_id("req_"),
                                                 **self._ratelimit_headers(limiter, time.monotonic())})
                completed = True
        finally:
            # A client that leaves early still pays: the model finished the answer (or the stream part sent).
            admission.settle(output_tokens, time.monotonic())
            self.stats.output_tokens_charged += admission.settled_tokens or 0
        if completed:
            self.stats.successes += 1
            self.stats.last_completion_time = self._since_start(time.monotonic())
            _bump(self.stats.request_bodies_by_fingerprint, fingerprint)
        return response

    def _message_for(self, body: Mapping[str, Any], fingerprint: str, total_tokens: int,
                     cache_plan: CachePlan) -> dict[str, Any]:
        """The answer for a body; the same body with or without "stream" gives the same message."""
        content_fingerprint = fingerprint
        if "stream" in body:
            content_fingerprint = body_fingerprint({k: v for k, v in body.items() if k != "stream"})
        seed = int(content_fingerprint[:16], 16) ^ self.config.seed
        answer = generate_answer(body, seed, self.config.output_tokens)
        usage = build_usage(total_tokens - cache_plan.read_tokens - cache_plan.write_tokens, cache_plan.write_tokens,
                            cache_plan.read_tokens, cache_plan.write_ttl, answer.output_tokens)
        return build_message(_new_id("msg_"), body["model"], answer, usage)

    def _record_admission(self, now: float, input_charge: int, output_tokens: int) -> None:
        moment = self._since_start(now)
        if self.stats.first_admission_time is None:
            self.stats.first_admission_time = moment
        self.stats.input_tokens_charged += input_charge
        if self.record_timeline:
            self.stats.admitted.append((moment, 1, input_charge, output_tokens))

    def _response_began(self, plan: CachePlan) -> None:
        """From the moment a response begins, the prefix it wrote becomes readable."""
        if plan.write_key is not None:
            self._cache.store(plan.write_key, plan.write_ttl, time.monotonic())
            self.stats.cache_writes += 1
            _bump(self.stats.cache_writes_by_prefix, plan.write_key[:16])
        if plan.read_key is not None:
            self.stats.cache_reads += 1

    async def _send_stream(self, request: web.Request, message: dict[str, Any], latency: float, fault: str | None,
                           limiter: ModelLimiter, admission: Admission,
                           cache_plan: CachePlan) -> tuple[web.StreamResponse, bool]:
        """Stream `message` as SSE with the latency spread over the events; returns (response, completed)."""
        events = [encode_sse(name, data) for name, data in stream_events(message)]
        cut = len(events)
        if fault == "no_content":
            cut = 2  # message_start and ping, then a clean end without message_stop
        elif fault in IN_STREAM_FAULTS:
            cut = max(4, len(events) // 2)  # after at least one delta
        gap = latency / max(1, len(events) - 1) + self.config.stream_event_interval_seconds
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                               "cache-control": "no-cache", "request-id": _new_id("req_"),
                                               **self._ratelimit_headers(limiter, time.monotonic())})
        await response.prepare(request)
        self._response_began(cache_plan)
        if gap <= 0:
            await response.write(b"".join(events[:cut]))
        else:
            for position, event in enumerate(events[:cut]):
                if position:
                    await asyncio.sleep(gap)
                await response.write(event)
        if cut == len(events):
            await response.write_eof()
            return response, True
        sent_tokens = message["usage"]["output_tokens"] * cut // len(events)
        admission.settle(sent_tokens, time.monotonic())
        if fault == "stream_drop":
            if request.transport is not None:
                request.transport.close()
            return response, False
        if fault == "stream_error":
            await response.write(encode_sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                                  "message": "Overloaded"}}))
        elif fault == "bad_json":
            await response.write(b'event: content_block_delta\ndata: {"type":"content_block_delta","ind\n\n')
        await response.write_eof()
        return response, False

    async def _answer_fault(self, request: web.Request, fault: str, body: Mapping[str, Any], fingerprint: str,
                            total_tokens: int, limiter: ModelLimiter) -> web.StreamResponse | None:
        """A fault that replaces the whole response (decided before rate limiting, so nothing is charged)."""
        if fault == "drop":
            if request.transport is not None:
                request.transport.close()
            return None
        if fault == "hang":
            await asyncio.sleep(HANG_SECONDS)
            return self._error(504, "timeout_error", "Request timed out")
        if fault in ("bad_json", "no_content"):
            message = self._message_for(body, fingerprint, total_tokens, NO_CACHE)
            headers = {"request-id": _new_id("req_"), **self._ratelimit_headers(limiter, time.monotonic())}
            if fault == "no_content":
                del message["content"]
                return web.Response(body=_dumps(message), content_type="application/json", headers=headers)
            payload = _dumps(message)
            return web.Response(body=payload[:len(payload) // 2], content_type="application/json", headers=headers)
        if fault.endswith("_html"):
            return _html_response(int(fault[:-5]))
        if not fault.isdigit():
            return self._error(400, "invalid_request_error", f"fake server: unknown fault code {fault!r}")
        status = int(fault)
        error_type = _fault_error_type(fault)
        headers = self._ratelimit_headers(limiter, time.monotonic())
        if status == 429 and self.config.retry_after_when_limited:
            headers["retry-after"] = "1"
        return self._error(status, error_type, ERROR_MESSAGE_BY_TYPE.get(error_type, "Error"), headers)

    # ---- POST /v1/messages/count_tokens ---------------------------------------------------------

    async def _handle_count_tokens(self, request: web.Request) -> web.Response:
        """{"input_tokens": N}; its own request limit, no charge to the Messages buckets."""
        now = time.monotonic()
        rejected = self._check_headers(request, now)
        if rejected is not None:
            return rejected
        self.stats.count_tokens_requests += 1
        bucket = self._count_tokens_bucket
        bucket.refill(now)
        if bucket.level < 1:
            return self._error(429, "rate_limit_error", "Too many count_tokens requests.",
                               {"retry-after": str(max(1, math.ceil(bucket.seconds_until(1))))})
        bucket.level -= 1
        try:
            body = parse_json_object(await request.read())
            validate_message_body(body, for_count_tokens=True)
            tokens = count_input_tokens(body)
        except RequestError as error:
            return self._error(error.status, error.error_type, error.message)
        return web.json_response({"input_tokens": tokens}, headers={"request-id": _new_id("req_")})

    # ---- Message Batches ------------------------------------------------------------------------

    async def _handle_batch_create(self, request: web.Request) -> web.Response:
        rejected = self._check_headers(request, time.monotonic())
        if rejected is not None:
            return rejected
        raw = await request.read()
        if len(raw) > MAX_BATCH_BODY_BYTES:
            return _too_large_response()
        try:
            body = parse_json_object(raw)
            del raw  # the parsed body is all we need; free the bytes of a large batch early
            batch = await self._build_batch(body)
        except RequestError as error:
            return self._error(error.status, error.error_type, error.message)
        self._batches[batch.id] = batch
        self.stats.batches_created += 1
        return web.json_response(batch.to_json(batch.created, self._base_url(request)),
                                 headers={"request-id": _new_id("req_")})

    async def _build_batch(self, body: Mapping[str, Any]) -> Batch:
        """Validate the batch (400 for the whole batch) and each item's params (errored items)."""
        items = body.get("requests")
        if not isinstance(items, list) or not items:
            raise _invalid("requests: Input should be a non-empty list")
        if len(items) > MAX_BATCH_REQUESTS:
            raise _invalid(f"requests: List should have at most {MAX_BATCH_REQUESTS:,} items")
        config = self.config
        batch_id = f"msgbatch_{self._rng.getrandbits(96):024x}"
        batch = Batch(batch_id, config.batch_processing_seconds, config.seed)
        outcome_rng = random.Random(f"{config.seed}:{batch_id}")
        seen_ids: set[str] = set()
        for index, item in enumerate(items):
            if index % BATCH_CREATE_YIELD_EVERY == BATCH_CREATE_YIELD_EVERY - 1:
                await asyncio.sleep(0)
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID_PATTERN.fullmatch(custom_id):
                raise _invalid(f"requests.{index}.custom_id: must be 1-64 characters of [A-Za-z0-9_-]")
            if custom_id in seen_ids:
                raise _invalid(f"requests.{index}.custom_id: duplicate custom_id {custom_id!r}")
            seen_ids.add(custom_id)
            params = item.get("params")
            if not isinstance(params, dict):
                raise _invalid(f"requests.{index}.params: Field required")
            params_bytes = canonical_json(params)
            batch.custom_ids.append(custom_id)
            batch.params.append(params_bytes)
            outcome, tokens = self._batch_item_outcome(batch, index, params, params_bytes, outcome_rng)
            batch.outcomes.append(outcome)
            batch.input_tokens.append(tokens)
        batch.start(time.monotonic(), time.time())
        return batch

    def _batch_item_outcome(self, batch: Batch, index: int, params: Mapping[str, Any], params_bytes: bytes,
                            rng: random.Random) -> tuple[int, int]:
        """(outcome, input tokens) of one item, decided when the batch is created."""
        draw = rng.random()  # drawn for every item so outcomes do not shift when one item is invalid
        try:
            validate_message_body(params)
            if params.get("stream"):
                raise _invalid("stream: streaming is not supported in batches")
            tokens = count_input_tokens(params)
            if params["model"] == NONEXISTENT_MODEL:
                raise RequestError(404, "not_found_error", f"model: {params['model']}")
        except RequestError as error:
            batch.errors[index] = (error.error_type, error.message)
            return OUTCOME_ERRORED, 0
        marker = find_fault_marker(params_bytes) if b"[[fault:" in params_bytes else None
        if marker is not None:
            kind, attempts = marker
            fingerprint = hashlib.sha256(params_bytes).hexdigest()
            seen = self._fault_attempts[fingerprint] = self._fault_attempts.get(fingerprint, 0) + 1
            if attempts is None or seen <= attempts:
                error_type = _fault_error_type(kind)
                batch.errors[index] = (error_type, ERROR_MESSAGE_BY_TYPE.get(error_type, "Error"))
                return OUTCOME_ERRORED, tokens
        config = self.config
        if draw < config.batch_error_rate:
            return OUTCOME_ERRORED, tokens
        if draw < config.batch_error_rate + config.batch_expire_rate:
            return OUTCOME_EXPIRED, tokens
        return OUTCOME_SUCCEEDED, tokens

    def _batch_result(self, batch: Batch, index: int, processed: int) -> dict[str, Any]:
        if index >= processed:
            return {"type": "canceled"}
        outcome = batch.outcomes[index]
        if outcome == OUTCOME_EXPIRED:
            return {"type": "expired"}
        if outcome == OUTCOME_ERRORED:
            error_type, message = batch.errors.get(index, ("api_error", ERROR_MESSAGE_BY_TYPE["api_error"]))
            return {"type": "errored", "error": {"type": "error", "error": {"type": error_type, "message": message}}}
        params_bytes = batch.params[index]
        params = json.loads(params_bytes)
        seed = int(hashlib.sha256(params_bytes).hexdigest()[:16], 16) ^ batch.seed
        answer = generate_answer(params, seed, self.config.output_tokens)
        usage = build_usage(batch.input_tokens[index], 0, 0, "5m", answer.output_tokens)
        message_id = "msg_" + hashlib.sha256(f"{batch.id}:{index}".encode()).hexdigest()[:24]
        return {"type": "succeeded", "message": build_message(message_id, params["model"], answer, usage)}

    @staticmethod
    def _base_url(request: web.Request) -> str:
        return str(request.url.origin())

    def _find_batch(self, request: web.Request) -> Batch | web.Response:
        rejected = self._check_headers(request, time.monotonic())
        if rejected is not None:
            return rejected
        batch_id = request.match_info["batch_id"]
        batch = self._batches.get(batch_id)
        if batch is None:
            return self._error(404, "not_found_error", f"No batch found with id {batch_id!r}")
        return batch

    async def _handle_batch_get(self, request: web.Request) -> web.Response:
        batch = self._find_batch(request)
        if isinstance(batch, web.Response):
            return batch
        return web.json_response(batch.to_json(time.monotonic(), self._base_url(request)),
                                 headers={"request-id": _new_id("req_")})

    async def _handle_batch_cancel(self, request: web.Request) -> web.Response:
        batch = self._find_batch(request)
        if isinstance(batch, web.Response):
            return batch
        now = time.monotonic()
        batch.cancel(now)
        return web.json_response(batch.to_json(now, self._base_url(request)), headers={"request-id": _new_id("req_")})

    async def _handle_batch_delete(self, request: web.Request) -> web.Response:
        batch = self._find_batch(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status(time.monotonic()) != "ended":
            return self._error(400, "invalid_request_error",
                               f"Batch {batch.id} is still processing; cancel it and wait for it to end first.")
        del self._batches[batch.id]
        return web.json_response({"id": batch.id, "type": "message_batch_deleted"},
                                 headers={"request-id": _new_id("req_")})

    async def _handle_batch_list(self, request: web.Request) -> web.Response:
        rejected = self._check_headers(request, time.monotonic())
        if rejected is not None:
            return rejected
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return self._error(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
        newest_first = sorted(self._batches.values(), key=lambda b: b.created, reverse=True)
        ids = [batch.id for batch in newest_first]
        start, end = 0, len(newest_first)
        if request.query.get("after_id") in ids:
            start = ids.index(request.query["after_id"]) + 1
        if request.query.get("before_id") in ids:
            end = ids.index(request.query["before_id"])
            start = max(start, end - limit)
        page = newest_first[start:min(end, start + limit)]
        now, base_url = time.monotonic(), self._base_url(request)
        return web.json_response({"data": [batch.to_json(now, base_url) for batch in page],
                                  "has_more": start + len(page) < end,
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None},
                                 headers={"request-id": _new_id("req_")})

    async def _handle_batch_results(self, request: web.Request) -> web.StreamResponse:
        """JSONL in shuffled order, generated and written in chunks so 100,000 items need little memory."""
        batch = self._find_batch(request)
        if isinstance(batch, web.Response):
            return batch
        now = time.monotonic()
        if batch.status(now) != "ended":
            return self._error(400, "invalid_request_error",
                               f"Batch {batch.id} has not ended yet; results are available once it has ended.")
        processed = batch.processed(now)
        order = list(range(len(batch.custom_ids)))
        random.Random(f"{batch.seed}:{batch.id}:results").shuffle(order)
        response = web.StreamResponse(headers={"content-type": "application/x-jsonl", "request-id": _new_id("req_")})
        await response.prepare(request)
        lines: list[bytes] = []
        for index in order:
            lines.append(_dumps({"custom_id": batch.custom_ids[index],
                                 "result": self._batch_result(batch, index, processed)}))
            if len(lines) >= BATCH_RESULTS_CHUNK_LINES:
                await response.write(b"\n".join(lines) + b"\n")
                lines.clear()
        if lines:
            await response.write(b"\n".join(lines) + b"\n")
        await response.write_eof()
        return response

    # ---- test-only endpoints --------------------------------------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_dict())

    async def _handle_config_get(self, request: web.Request) -> web.Response:
        return web.json_response(config_to_dict(self.config))

    async def _handle_config_post(self, request: web.Request) -> web.Response:
        try:
            changes = parse_json_object(await request.read())
            apply_config_changes(self.config, changes)
        except (RequestError, ValueError, TypeError) as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(config_to_dict(self.config))


# ==================================================================================================
# The background-thread runner
# ==================================================================================================

START_TIMEOUT_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 5.0


class ServerThread:
    """Runs a FakeAnthropicServer on its own event loop in a daemon thread.

        with ServerThread(config) as srv:
            requests go to srv.messages_url; srv.stats_snapshot(); srv.set_config(fault_rate=0.1)
    """

    def __init__(self, config: ServerConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 record_timeline: bool = False) -> None:
        self.server = FakeAnthropicServer(config, record_timeline=record_timeline)
        self.url = ""
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def messages_url(self) -> str:
        return f"{self.url}/v1/messages"

    def start(self) -> ServerThread:
        ready = threading.Event()
        failures: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self.url = loop.run_until_complete(self.server.start(self._host, self._port))
            except BaseException as error:  # handed to the starting thread, which raises it
                failures.append(error)
                loop.close()
                ready.set()
                return
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-anthropic-server", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_SECONDS):
            raise RuntimeError("the fake server did not start in time")
        if failures:
            raise failures[0]
        return self

    def stop(self) -> None:
        """Close the server (cancelling hanging handlers) and end the thread; safe to call twice."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(STOP_TIMEOUT_SECONDS)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(STOP_TIMEOUT_SECONDS)

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run function on the server's loop, so it never races a request handler."""
        if self._loop is None:
            raise RuntimeError("the server is not running")

        async def call() -> Any:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(STOP_TIMEOUT_SECONDS)

    def stats_snapshot(self) -> dict[str, Any]:
        return self._call(self.server.stats.to_dict)

    def set_config(self, **changes: Any) -> None:
        """Change ServerConfig fields (plain values as accepted by apply_config_changes)."""
        self._call(apply_config_changes, self.server.config, changes)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ==================================================================================================
# Command line
# ==================================================================================================


def _pair(text: str, convert: Callable[[str], Any]) -> tuple[Any, Any]:
    """"0.5,5" -> (0.5, 5.0); a single value means a fixed value."""
    values = [convert(part) for part in text.split(",")]
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}")
    return values[0], values[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake server until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Fake Anthropic Messages API server (no API key needed).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--rpm", type=float, default=ModelLimits.requests_per_minute,
                        help="requests per minute, for every model class")
    parser.add_argument("--itpm", type=float, default=ModelLimits.input_tokens_per_minute,
                        help="input tokens per minute, for every model class")
    parser.add_argument("--otpm", type=float, default=ModelLimits.output_tokens_per_minute,
                        help="output tokens per minute, for every model class")
    parser.add_argument("--latency", type=lambda text: _pair(text, float), default=(0.0, 0.0),
                        help="seconds per request, LOW,HIGH (uniform random)")
    parser.add_argument("--output_tokens", type=lambda text: _pair(text, int), default=(20, 20),
                        help="tokens per answer, LOW,HIGH (uniform random, capped by max_tokens)")
    parser.add_argument("--fault_rate", type=float, default=0.0, help="probability of a random fault")
    parser.add_argument("--api_key", default=None, help="accept only this key (default: any non-empty key)")
    parser.add_argument("--output_accounting", choices=("produced", "max_tokens"), default="produced")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = ServerConfig(
        limits={DEFAULT_CLASS: ModelLimits(args.rpm, args.itpm, args.otpm)}, latency_seconds=args.latency,
        output_tokens=args.output_tokens, fault_rate=args.fault_rate, api_key=args.api_key,
        output_accounting=args.output_accounting, seed=args.seed)
    try:
        asyncio.run(_serve_forever(config, args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


async def _serve_forever(config: ServerConfig, host: str, port: int) -> None:
    server = FakeAnthropicServer(config)
    url = await server.start(host, port)
    key_rule = "only the key given with --api_key" if config.api_key else "any non-empty x-api-key"
    print(f"Fake Anthropic API listening on {url} (accepts {key_rule})", flush=True)
    print(f"  use --request_url {url}/v1/messages ; stats at {url}/__stats ; Ctrl-C to stop", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    sys.exit(main())

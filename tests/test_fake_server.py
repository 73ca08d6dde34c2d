"""Tests of the fake Anthropic API server itself: what a client sees when it talks to it.

Run: /tmp/venv/bin/python -m pytest tests/test_fake_server.py -q
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fake_server import (
    FakeAnthropicServer,
    ModelLimits,
    ServerConfig,
    ServerThread,
    TokenBucket,
    body_fingerprint,
    count_input_tokens,
    count_text_tokens,
    image_dimensions,
    image_tokens,
    model_class,
)

API_HEADERS = {"x-api-key": "sk-test-secret-key", "anthropic-version": "2023-06-01"}
RATELIMIT_HEADERS = [f"anthropic-ratelimit-{name}-{suffix}"
                     for name in ("requests", "input-tokens", "output-tokens", "tokens")
                     for suffix in ("limit", "remaining", "reset")]
# ~1,500 fake tokens: enough for a cacheable prefix (minimum 1,024).
LONG_SYSTEM_TEXT = " ".join(["cat sat on the mat"] * 300)


def message_body(text: str = "Hello there, how are you today?", **extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": text}], **extra}


def cached_body(question: str, ttl: str | None = None) -> dict[str, Any]:
    cache_control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return message_body(question, system=[{"type": "text", "text": LONG_SYSTEM_TEXT, "cache_control": cache_control}])


@contextlib.asynccontextmanager
async def running(config: ServerConfig | None = None) -> AsyncIterator[tuple[FakeAnthropicServer, str,
                                                                             aiohttp.ClientSession]]:
    server = FakeAnthropicServer(config or ServerConfig())
    base_url = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield server, base_url, session
    finally:
        await server.stop()


async def post(session: aiohttp.ClientSession, url: str, payload: Any,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """(status, headers, parsed JSON or text) of one POST."""
    async with session.post(url, json=payload, headers=API_HEADERS if headers is None else headers) as response:
        text = await response.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.status, response.headers, parsed


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url, headers=API_HEADERS) as response:
        return response.status, await response.json()


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def reassemble(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What a client builds from a stream, following the documented event semantics."""
    message: dict[str, Any] = {}
    partial_json: dict[int, str] = {}
    for name, data in events:
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            message["content"].append(data["content_block"])
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial_json[data["index"]] = partial_json.get(data["index"], "") + delta["partial_json"]
        elif name == "content_block_stop":
            if data["index"] in partial_json:
                message["content"][data["index"]]["input"] = json.loads(partial_json[data["index"]])
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"].update(data["usage"])
    return message


# --------------------------------------------------------------------------------------------------
# A successful answer
# --------------------------------------------------------------------------------------------------


def test_answer_has_the_real_shape_headers_and_exact_token_count() -> None:
    async def scenario() -> None:
        async with running(ServerConfig(output_tokens=(30, 30))) as (_, url, session):
            status, headers, message = await post(session, f"{url}/v1/messages", message_body())
        assert status == 200
        assert headers["content-type"].startswith("application/json")
        assert headers["request-id"].startswith("req_")
        assert all(name in headers for name in RATELIMIT_HEADERS)
        assert message["id"].startswith("msg_") and len(message["id"]) == 28
        assert (message["type"], message["role"], message["model"]) == ("message", "assistant", "claude-sonnet-4-5")
        assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
        text = message["content"][0]["text"]
        assert text.startswith("Hello there, how are you")  # an echo of the question
        assert count_text_tokens(text) == message["usage"]["output_tokens"] == 30
        assert message["usage"] == {
            "input_tokens": count_input_tokens(message_body()), "output_tokens": 30,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}

    asyncio.run(scenario())


def test_max_tokens_caps_the_answer() -> None:
    async def scenario() -> None:
        async with running(ServerConfig(output_tokens=(50, 50))) as (_, url, session):
            _, _, message = await post(session, f"{url}/v1/messages", {**message_body(), "max_tokens": 7})
        assert message["stop_reason"] == "max_tokens"
        assert message["usage"]["output_tokens"] == 7 == count_text_tokens(message["content"][0]["text"])

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------------


def test_empty_request_bucket_gives_429_with_retry_after_and_headers() -> None:
    async def scenario() -> None:
        config = ServerConfig(limits={"default": ModelLimits(requests_per_minute=2)})
        async with running(config) as (server, url, session):
            first = await post(session, f"{url}/v1/messages", message_body())
            await post(session, f"{url}/v1/messages", message_body())
            status, headers, error = await post(session, f"{url}/v1/messages", message_body())
        assert first[1]["anthropic-ratelimit-requests-limit"] == "2"
        assert first[1]["anthropic-ratelimit-requests-remaining"] == "1"
        assert status == 429
        assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
        assert "requests per minute" in error["error"]["message"]
        assert 1 <= int(headers["retry-after"]) <= 30  # one request refills in 30 s at 2 per minute
        assert headers["anthropic-ratelimit-requests-remaining"] == "0"
        reset = datetime.datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
        assert reset > datetime.datetime.now(datetime.timezone.utc)
        assert server.stats.rate_limited == 1 and server.stats.responses_by_status == {200: 2, 429: 1}

    asyncio.run(scenario())


def test_input_tokens_are_limited_and_an_oversized_request_waits_for_a_full_bucket() -> None:
    async def scenario() -> None:
        big = message_body(" ".join(["word"] * 200))  # over 200 tokens, more than the whole bucket
        config = ServerConfig(limits={"default": ModelLimits(input_tokens_per_minute=150)})
        async with running(config) as (_, url, session):
            admitted = await post(session, f"{url}/v1/messages", big)
            status, headers, error = await post(session, f"{url}/v1/messages", message_body())
        assert admitted[0] == 200  # a full bucket admits it rather than refusing forever
        assert status == 429 and "input tokens per minute" in error["error"]["message"]
        assert int(headers["retry-after"]) >= 2

    asyncio.run(scenario())


def test_token_bucket_refills_continuously() -> None:
    bucket = TokenBucket(60, now=100.0)  # 60 per minute = 1 per second
    bucket.level -= 60
    assert bucket.seconds_until(1) == pytest.approx(1.0)
    bucket.refill(100.5)
    assert bucket.level == pytest.approx(0.5)
    bucket.refill(1000.0)
    assert bucket.level == 60  # never above capacity


def test_requests_are_admitted_again_after_refill() -> None:
    async def scenario() -> None:
        config = ServerConfig(limits={"default": ModelLimits(requests_per_minute=120)})  # 2 per second
        async with running(config) as (_, url, session):
            statuses = [r[0] for r in await asyncio.gather(
                *[post(session, f"{url}/v1/messages", message_body()) for _ in range(121)])]
            assert statuses.count(200) == 120 and statuses.count(429) == 1
            await asyncio.sleep(0.6)
            status, _, _ = await post(session, f"{url}/v1/messages", message_body())
        assert status == 200

    asyncio.run(scenario())


def test_model_ids_of_one_class_share_limits() -> None:
    assert model_class("claude-sonnet-4-5-20250929") == model_class("claude-sonnet-4-5") == "claude-sonnet-4-5"

    async def scenario() -> None:
        config = ServerConfig(limits={"default": ModelLimits(),
                                      "claude-sonnet-4-5": ModelLimits(requests_per_minute=1)})
        async with running(config) as (_, url, session):
            dated = await post(session, f"{url}/v1/messages", {**message_body(), "model": "claude-sonnet-4-5-20250929"})
            undated = await post(session, f"{url}/v1/messages", message_body())
            other = await post(session, f"{url}/v1/messages", {**message_body(), "model": "claude-haiku-4-5"})
        assert (dated[0], undated[0], other[0]) == (200, 429, 200)
        assert other[1]["anthropic-ratelimit-requests-limit"] == str(int(ModelLimits().requests_per_minute))

    asyncio.run(scenario())


def test_output_accounting_produced_versus_max_tokens() -> None:
    async def statuses(accounting: str) -> list[int]:
        config = ServerConfig(limits={"default": ModelLimits(output_tokens_per_minute=100)}, output_tokens=(60, 60),
                              output_accounting=accounting)
        async with running(config) as (_, url, session):
            return [(await post(session, f"{url}/v1/messages", message_body()))[0] for _ in range(3)]

    # 2026 docs: admitted while the bucket is above zero, charged 60 each: 100 -> 40 -> -20.
    assert asyncio.run(statuses("produced")) == [200, 200, 429]
    # 2025 docs: max_tokens (100) is reserved up front, the unused 40 refunded: 100 -> 40, then 40 < 100.
    assert asyncio.run(statuses("max_tokens")) == [200, 429, 429]


# --------------------------------------------------------------------------------------------------
# Prompt caching
# --------------------------------------------------------------------------------------------------


def test_cache_write_then_read() -> None:
    async def scenario() -> None:
        async with running() as (server, url, session):
            _, _, first = await post(session, f"{url}/v1/messages", cached_body("First question?"))
            _, _, second = await post(session, f"{url}/v1/messages", cached_body("Second question?"))
            _, _, hour = await post(session, f"{url}/v1/messages", cached_body("Third?", ttl="1h"))
            stats = server.stats
        written = first["usage"]["cache_creation_input_tokens"]
        assert written >= 1024 and first["usage"]["cache_read_input_tokens"] == 0
        assert first["usage"]["cache_creation"]["ephemeral_5m_input_tokens"] == written
        assert first["usage"]["input_tokens"] + written == count_input_tokens(cached_body("First question?"))
        assert second["usage"]["cache_read_input_tokens"] == written
        assert second["usage"]["cache_creation_input_tokens"] == 0
        assert hour["usage"]["cache_read_input_tokens"] == written  # the TTL setting does not change the prefix
        assert (stats.cache_writes, stats.cache_reads) == (1, 2)
        # Cache reads are not charged against the input-token limit.
        charged = sum(message["usage"]["input_tokens"] + message["usage"]["cache_creation_input_tokens"]
                      for message in (first, second, hour))
        assert stats.input_tokens_charged == charged < 2 * written

    asyncio.run(scenario())


def test_prefix_below_the_minimum_is_not_cached() -> None:
    async def scenario() -> None:
        body = message_body("Hi", system=[{"type": "text", "text": "short", "cache_control": {"type": "ephemeral"}}])
        async with running() as (_, url, session):
            for _ in range(2):
                _, _, message = await post(session, f"{url}/v1/messages", body)
                assert message["usage"]["cache_creation_input_tokens"] == 0
                assert message["usage"]["cache_read_input_tokens"] == 0

    asyncio.run(scenario())


def test_concurrent_requests_with_a_cold_prefix_each_write_it() -> None:
    async def scenario() -> None:
        async with running(ServerConfig(latency_seconds=(0.2, 0.2))) as (server, url, session):
            answers = await asyncio.gather(*[post(session, f"{url}/v1/messages", cached_body(f"Question {i}?"))
                                             for i in range(2)])
            _, _, later = await post(session, f"{url}/v1/messages", cached_body("Later?"))
            by_prefix = dict(server.stats.cache_writes_by_prefix)
        assert all(message["usage"]["cache_creation_input_tokens"] > 0 for _, _, message in answers)
        assert list(by_prefix.values()) == [2]
        assert later["usage"]["cache_read_input_tokens"] > 0

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------

STREAM_CASES = {
    "text": message_body("Tell me a story"),
    "thinking": {**message_body("Think first"), "max_tokens": 3000,
                 "thinking": {"type": "enabled", "budget_tokens": 1024}},
    "tool": message_body("Weather in Paris?", tools=[{"name": "get_weather", "description": "Weather of a city",
                                                       "input_schema": {"type": "object", "properties": {
                                                           "city": {"type": "string"}, "days": {"type": "integer"}}}}],
                         tool_choice={"type": "any"}),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_reassembled_stream_equals_the_non_streamed_message(case: str) -> None:
    async def scenario() -> None:
        body = STREAM_CASES[case]
        async with running(ServerConfig(output_tokens=(40, 120))) as (_, url, session):
            _, _, plain = await post(session, f"{url}/v1/messages", body)
            async with session.post(f"{url}/v1/messages", json={**body, "stream": True}, headers=API_HEADERS) as r:
                assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = parse_sse(await r.text())
        names = [name for name, _ in events]
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
        assert "ping" in names
        assert events[0][1]["message"]["usage"]["output_tokens"] == 1
        streamed = reassemble(events)
        assert streamed["id"].startswith("msg_")
        assert {**streamed, "id": None} == {**plain, "id": None}

    asyncio.run(scenario())


def test_thinking_and_tool_answers_have_their_blocks() -> None:
    async def scenario() -> None:
        async with running(ServerConfig(output_tokens=(60, 60))) as (_, url, session):
            _, _, thinking = await post(session, f"{url}/v1/messages", STREAM_CASES["thinking"])
            _, _, tool = await post(session, f"{url}/v1/messages", STREAM_CASES["tool"])
        assert [block["type"] for block in thinking["content"]] == ["thinking", "text"]
        assert thinking["content"][0]["signature"]
        assert tool["stop_reason"] == "tool_use"
        call = tool["content"][0]
        assert call["type"] == "tool_use" and call["id"].startswith("toolu_") and call["name"] == "get_weather"
        assert set(call["input"]) == {"city", "days"} and tool["usage"]["output_tokens"] == 60

    asyncio.run(scenario())


def test_stream_latency_is_spread_over_the_events() -> None:
    async def scenario() -> None:
        config = ServerConfig(latency_seconds=(0.4, 0.4), output_tokens=(100, 100))
        async with running(config) as (_, url, session):
            started = time.monotonic()
            async with session.post(f"{url}/v1/messages", json={**message_body(), "stream": True},
                                    headers=API_HEADERS) as response:
                first_chunk = await response.content.readany()
                first_at = time.monotonic() - started
                await response.read()
            total = time.monotonic() - started
        assert first_chunk.startswith(b"event: message_start")
        assert first_at < 0.2 <= 0.35 < total

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------


def test_fault_marker_with_count_fails_the_first_attempts_then_answers() -> None:
    async def scenario() -> None:
        body = message_body("Please answer [[fault:529*2]]")
        async with running() as (server, url, session):
            results = [await post(session, f"{url}/v1/messages", body) for _ in range(3)]
            assert server.stats.faults_injected == {"529": 2}
            assert server.stats.request_bodies_by_fingerprint == {body_fingerprint(body): 1}
        assert [status for status, _, _ in results] == [529, 529, 200]
        assert results[0][2]["error"]["type"] == "overloaded_error"
        assert results[0][1]["x-should-retry"] == "true"
        assert all(name in results[0][1] for name in RATELIMIT_HEADERS)

    asyncio.run(scenario())


def test_fault_markers_for_status_html_and_broken_bodies() -> None:
    async def scenario() -> None:
        async with running() as (_, url, session):
            always = [await post(session, f"{url}/v1/messages", message_body("x [[fault:500]]")) for _ in range(2)]
            html_status, html_headers, html = await post(session, f"{url}/v1/messages",
                                                         message_body("[[fault:503_html]]"))
            bad_status, _, bad = await post(session, f"{url}/v1/messages", message_body("[[fault:bad_json]]"))
            _, _, no_content = await post(session, f"{url}/v1/messages", message_body("[[fault:no_content]]"))
            forbidden = await post(session, f"{url}/v1/messages", message_body("[[fault:403]]"))
            overloaded = await post(session, f"{url}/v1/messages", message_body("[[fault:stream_error]]"))
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await post(session, f"{url}/v1/messages", message_body("[[fault:drop]]"))
        assert [status for status, _, _ in always] == [500, 500] and always[0][2]["error"]["type"] == "api_error"
        assert html_status == 503 and html_headers["content-type"].startswith("text/html") and "<html>" in html
        assert bad_status == 200 and isinstance(bad, str)  # not parseable JSON
        assert no_content["type"] == "message" and "content" not in no_content
        assert forbidden[0] == 403 and forbidden[2]["error"]["type"] == "permission_error"
        assert overloaded[0] == 529  # a non-streamed request cannot fail mid-stream

    asyncio.run(scenario())


def test_mid_stream_faults() -> None:
    async def scenario() -> None:
        config = ServerConfig(output_tokens=(200, 200))
        async with running(config) as (_, url, session):
            body = {**message_body("[[fault:stream_error]]"), "max_tokens": 500, "stream": True}
            async with session.post(f"{url}/v1/messages", json=body, headers=API_HEADERS) as response:
                events = parse_sse(await response.text())
            assert response.status == 200
            assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                       "message": "Overloaded"}})
            assert "content_block_delta" in [name for name, _ in events]
            body = {**message_body("[[fault:stream_drop]]"), "max_tokens": 500, "stream": True}
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.post(f"{url}/v1/messages", json=body, headers=API_HEADERS) as response:
                    await response.read()

    asyncio.run(scenario())


def test_random_faults_follow_the_configured_rate_and_kinds() -> None:
    async def scenario() -> None:
        config = ServerConfig(fault_rate=0.5, fault_kinds=("500", "529"), seed=7)
        async with running(config) as (server, url, session):
            statuses = [(await post(session, f"{url}/v1/messages", message_body()))[0] for _ in range(60)]
            injected = dict(server.stats.faults_injected)
        assert set(statuses) == {200, 500, 529}
        assert 15 <= statuses.count(200) <= 45
        assert sum(injected.values()) == 60 - statuses.count(200)

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Authentication, spend limit, validation
# --------------------------------------------------------------------------------------------------


def test_missing_or_wrong_api_key_gives_401_and_the_key_is_never_echoed() -> None:
    async def scenario() -> None:
        async with running(ServerConfig(api_key="sk-right")) as (server, url, session):
            missing = await post(session, f"{url}/v1/messages", message_body(), headers={"anthropic-version": "x"})
            wrong = await post(session, f"{url}/v1/messages", message_body())
            right = await post(session, f"{url}/v1/messages", message_body(),
                               headers={**API_HEADERS, "x-api-key": "sk-right"})
            _, stats = await get(session, f"{url}/__stats")
            _, config = await get(session, f"{url}/__config")
        assert (missing[0], wrong[0], right[0]) == (401, 401, 200)
        assert wrong[2]["error"]["type"] == "authentication_error"
        assert stats["api_keys_seen_count"] == 2
        assert "sk-test-secret-key" not in json.dumps([stats, config, wrong[2]])
        assert "sk-right" not in json.dumps([stats, config])

    asyncio.run(scenario())


def test_spend_limit_gives_429_without_retry_after() -> None:
    async def scenario() -> None:
        async with running() as (_, url, session):
            status, headers, error = await post(session, f"{url}/v1/messages", message_body("[[spend_limit]]"))
        assert status == 429 and "retry-after" not in headers
        assert error["error"]["type"] == "rate_limit_error"
        assert error["error"]["details"] == {"error_code": "enforced_spend_limit_reached"}

    asyncio.run(scenario())


@pytest.mark.parametrize(("change", "status", "fragment"), [
    ({"metadata": {"user_id": "u", "line": 3}}, 400, "metadata.line"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": None}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, 400, "role"),
    ({"model": 5}, 400, "model"),
    ({"my_own_field": 1}, 400, "Extra inputs are not permitted"),
    ({"model": "claude-does-not-exist"}, 404, "claude-does-not-exist"),
])
def test_invalid_requests_are_refused_like_the_real_api(change: dict[str, Any], status: int, fragment: str) -> None:
    async def scenario() -> None:
        body = {key: value for key, value in {**message_body(), **change}.items() if value is not None}
        async with running() as (_, url, session):
            got_status, headers, error = await post(session, f"{url}/v1/messages", body)
        assert got_status == status and fragment in error["error"]["message"]
        assert error["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
        assert "anthropic-ratelimit-requests-remaining" in headers

    asyncio.run(scenario())


def test_bad_json_missing_version_and_oversized_bodies() -> None:
    async def scenario() -> None:
        async with running() as (_, url, session):
            async with session.post(f"{url}/v1/messages", data=b"{not json", headers=API_HEADERS) as response:
                assert response.status == 400
            array_body = await post(session, f"{url}/v1/messages", [1, 2])
            no_version = await post(session, f"{url}/v1/messages", message_body(), headers={"x-api-key": "k"})
            huge = message_body("a " * (17 * 1024 * 1024))  # 34 MB of JSON
            too_large = await post(session, f"{url}/v1/messages", huge)
        assert array_body[0] == 400 and no_version[0] == 400
        assert too_large[0] == 413 and isinstance(too_large[2], str)  # from the edge proxy, not JSON

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Token counting
# --------------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height) + bytes(9)


def test_fake_tokenizer_counts_more_than_one_token_per_english_word() -> None:
    sentence = "The quick brown fox jumps over the lazy dog."
    assert count_text_tokens(sentence) == 13  # cl100k gives 10: the client has to learn a correction
    assert count_text_tokens("internationalization") == 5


def test_image_and_document_tokens() -> None:
    assert image_dimensions(png_header(800, 600)) == (800, 600)
    assert image_dimensions(b"GIF89a" + struct.pack("<HH", 30, 20)) == (30, 20)
    app0_segment = b"\xff\xe0" + struct.pack(">H", 16) + bytes(14)
    jpeg = b"\xff\xd8" + app0_segment + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 480, 640)
    assert image_dimensions(jpeg) == (640, 480)
    assert image_tokens(800, 600) == 640
    assert image_tokens(4000, 3000) == 1600  # downscaled, then capped
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png_header(800, 600)).decode()}}
    two_pages = b"%PDF-1.4 /Type /Pages /Type /Page /Type /Page"
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                          "data": base64.b64encode(two_pages).decode()}}
    plain = message_body("x")
    with_blocks = {**plain, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, image, pdf]}]}
    assert count_input_tokens(with_blocks) - count_input_tokens(plain) == 640 + 2 * 1500


def test_count_tokens_endpoint_matches_usage() -> None:
    async def scenario() -> None:
        body = message_body("How many tokens is this sentence, approximately?",
                            system="You are terse.", tools=STREAM_CASES["tool"]["tools"])
        async with running() as (server, url, session):
            status, _, counted = await post(session, f"{url}/v1/messages/count_tokens",
                                            {k: v for k, v in body.items() if k != "max_tokens"})
            _, _, message = await post(session, f"{url}/v1/messages", body)
            assert server.stats.requests_received == 1  # count_tokens is not a Messages request
        assert status == 200 and counted == {"input_tokens": message["usage"]["input_tokens"]}

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Message Batches
# --------------------------------------------------------------------------------------------------


async def wait_until_ended(session: aiohttp.ClientSession, url: str, batch_id: str) -> dict[str, Any]:
    for _ in range(100):
        _, batch = await get(session, f"{url}/v1/messages/batches/{batch_id}")
        if batch["processing_status"] == "ended":
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError("batch did not end")


def test_batch_lifecycle_with_shuffled_results_errors_and_expiry() -> None:
    async def scenario() -> None:
        requests = [{"custom_id": f"line-{i}", "params": message_body(f"Question {i}")} for i in range(200)]
        requests[3]["params"] = {"model": "claude-sonnet-4-5", "messages": []}  # invalid params
        requests[4]["params"] = message_body("[[fault:529]]")
        config = ServerConfig(batch_processing_seconds=0.4, batch_error_rate=0.1, batch_expire_rate=0.1)
        async with running(config) as (server, url, session):
            status, _, created = await post(session, f"{url}/v1/messages/batches", {"requests": requests})
            early = await session.get(f"{url}/v1/messages/batches/{created['id']}/results", headers=API_HEADERS)
            ended = await wait_until_ended(session, url, created["id"])
            async with session.get(ended["results_url"], headers=API_HEADERS) as response:
                lines = [json.loads(line) for line in (await response.text()).splitlines()]
            assert server.stats.batches_created == 1
        assert status == 200 and created["id"].startswith("msgbatch_") and created["type"] == "message_batch"
        assert created["processing_status"] == "in_progress" and created["results_url"] is None
        assert created["request_counts"]["processing"] == 200
        assert early.status == 400
        counts = ended["request_counts"]
        assert counts["processing"] == 0 and sum(counts.values()) == 200 and counts["canceled"] == 0
        assert 5 <= counts["expired"] <= 40 and 5 <= counts["errored"] <= 40
        assert ended["ended_at"] is not None and ended["results_url"].endswith(f"/{created['id']}/results")
        ids = [line["custom_id"] for line in lines]
        assert sorted(ids) == sorted(r["custom_id"] for r in requests) and ids != [r["custom_id"] for r in requests]
        by_id = {line["custom_id"]: line["result"] for line in lines}
        assert by_id["line-3"]["error"]["error"]["type"] == "invalid_request_error"
        assert by_id["line-4"] == {"type": "errored", "error": {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}}}
        types = [result["type"] for result in by_id.values()]
        assert (types.count("succeeded"), types.count("errored"), types.count("expired")) == (
            counts["succeeded"], counts["errored"], counts["expired"])
        succeeded = next(result for result in by_id.values() if result["type"] == "succeeded")
        assert succeeded["message"]["content"][0]["text"].startswith("Question")

    asyncio.run(scenario())


def test_batch_cancel_list_delete_and_validation() -> None:
    async def scenario() -> None:
        requests = [{"custom_id": f"c{i}", "params": message_body()} for i in range(50)]
        async with running(ServerConfig(batch_processing_seconds=5)) as (_, url, session):
            _, _, created = await post(session, f"{url}/v1/messages/batches", {"requests": requests})
            batch_url = f"{url}/v1/messages/batches/{created['id']}"
            refused_delete = await session.delete(batch_url, headers=API_HEADERS)
            _, _, canceling = await post(session, f"{batch_url}/cancel", {})
            ended = await wait_until_ended(session, url, created["id"])
            async with session.get(f"{batch_url}/results", headers=API_HEADERS) as response:
                results = [json.loads(line)["result"]["type"] for line in (await response.text()).splitlines()]
            _, listing = await get(session, f"{url}/v1/messages/batches?limit=10")
            async with session.delete(batch_url, headers=API_HEADERS) as response:
                deleted = await response.json()
            missing, _ = await get(session, batch_url)
            duplicate = await post(session, f"{url}/v1/messages/batches", {"requests": requests[:1] * 2})
            bad_id = await post(session, f"{url}/v1/messages/batches",
                                {"requests": [{"custom_id": "bad id!", "params": message_body()}]})
        assert refused_delete.status == 400
        assert canceling["processing_status"] == "canceling" and canceling["cancel_initiated_at"] is not None
        assert ended["request_counts"]["canceled"] == results.count("canceled") > 40
        assert listing["data"][0]["id"] == created["id"] and listing["has_more"] is False
        assert deleted == {"id": created["id"], "type": "message_batch_deleted"} and missing == 404
        assert duplicate[0] == 400 and bad_id[0] == 400

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Driving the server: thread, test endpoints, command line
# --------------------------------------------------------------------------------------------------


def test_server_thread_starts_fast_and_stops_with_a_hanging_request_in_flight() -> None:
    errors: list[BaseException] = []

    def hanging_client(url: str) -> None:
        async def call() -> None:
            async with aiohttp.ClientSession() as session:
                await post(session, url, message_body("[[fault:hang]]"))

        try:
            asyncio.run(call())
        except BaseException as error:  # the server going away is the expected outcome
            errors.append(error)

    started = time.monotonic()
    with ServerThread(ServerConfig()) as srv:
        assert time.monotonic() - started < 0.5
        client = threading.Thread(target=hanging_client, args=(srv.messages_url,))
        client.start()
        for _ in range(100):
            if srv.stats_snapshot()["in_flight"] == 1:
                break
            time.sleep(0.02)
        assert srv.stats_snapshot()["faults_injected"] == {"hang": 1}
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 1.0
    client.join(5)
    assert not client.is_alive() and isinstance(errors[0], aiohttp.ClientError)


def test_server_thread_set_config_and_http_config() -> None:
    async def call(url: str, path: str, payload: Any) -> int:
        async with aiohttp.ClientSession() as session:
            return (await post(session, f"{url}{path}", payload))[0]

    with ServerThread(ServerConfig(), record_timeline=True) as srv:
        srv.set_config(limits={"default": {"requests_per_minute": 1}})
        assert [asyncio.run(call(srv.url, "/v1/messages", message_body())) for _ in range(2)] == [200, 429]
        assert asyncio.run(call(srv.url, "/__config", {"limits": {"default": {"requests_per_minute": 1e6}}})) == 200
        assert asyncio.run(call(srv.url, "/v1/messages", message_body())) == 200
        assert asyncio.run(call(srv.url, "/__config", {"no_such_field": 1})) == 400
        stats = srv.stats_snapshot()
    assert stats["responses_by_status"] == {200: 2, 429: 1}
    assert [entry[1] for entry in stats["admitted"]] == [1, 1]
    assert stats["first_admission_time"] <= stats["last_completion_time"]


def test_command_line_serves_until_stopped() -> None:
    script = Path(__file__).with_name("fake_server.py")
    process = subprocess.Popen([sys.executable, str(script), "--port", "0", "--rpm", "1"],
                               stdout=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline() if process.stdout else ""
        base_url = first_line.split(" listening on ")[1].split()[0]

        async def scenario() -> list[int]:
            async with aiohttp.ClientSession() as session:
                return [(await post(session, f"{base_url}/v1/messages", message_body()))[0] for _ in range(2)]

        assert asyncio.run(scenario()) == [200, 429]
    finally:
        process.terminate()
        process.wait(5)

"""Unit tests of the pure pieces of api_request_parallel_processor.py.

No network and no sleeping: every piece that depends on time takes `now` as an argument.
"""

from __future__ import annotations

import base64
import email.utils
import json
import math
import random
import re
import struct
import sys
import threading
from array import array
from pathlib import Path

import pytest
from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `pytest tests` works from anywhere, not only `python -m pytest`
    sys.path.insert(0, str(ROOT))

import api_request_parallel_processor as app


def words(text: str) -> int:
    """A simple, predictable tokenizer for the estimation tests: one token per word."""
    return len(text.split())


def line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode("utf-8")


def valid_body(**changes) -> dict:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
    body.update(changes)
    return body


@pytest.fixture
def warnings_logged():
    """Every loguru record at WARNING or above logged during the test."""
    records = []
    handler_id = logger.add(lambda message: records.append(message.record), level="WARNING")
    yield records
    logger.remove(handler_id)


# ======================================================================================================
# 3. Reading requests
# ======================================================================================================


def test_blank_line_is_skipped():
    assert app.parse_request_line(b"\n", 1) is None
    assert app.parse_request_line(b"   \r\n", 2) is None


def test_valid_line_becomes_a_job_with_its_line_number():
    job = app.parse_request_line(line(valid_body()), 7)
    assert isinstance(job, app.Job)
    assert job.line_number == 7
    assert job.body == valid_body()
    assert job.model == "claude-sonnet-4-5"


def test_invalid_utf8_is_an_invalid_line_naming_the_problem():
    result = app.parse_request_line(b'{"model": "\xff\xfe"}\n', 3)
    assert isinstance(result, app.InvalidLine)
    assert result.line_number == 3
    assert "UTF-8" in result.reason
    assert result.result_line()[1][0].startswith("line 3: not valid UTF-8")


def test_text_that_is_not_json_is_an_invalid_line():
    result = app.parse_request_line(b"{model: claude}\n", 4)
    assert isinstance(result, app.InvalidLine)
    assert "not valid JSON" in result.reason
    assert result.request == "{model: claude}"


def test_json_array_is_an_invalid_line_asking_for_an_object():
    result = app.parse_request_line(b'[{"model": "x"}]\n', 5)
    assert isinstance(result, app.InvalidLine)
    assert result.reason == "expected a JSON object, got list"
    assert result.request == [{"model": "x"}]


INVALID_BODIES = [
    ("model missing", {"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}, "`model`"),
    ("model not a string", valid_body(model=42), "`model`"),
    ("model empty", valid_body(model="  "), "`model`"),
    ("max_tokens zero", valid_body(max_tokens=0), "`max_tokens`"),
    ("max_tokens a string", valid_body(max_tokens="5"), "`max_tokens`"),
    ("max_tokens a boolean", valid_body(max_tokens=True), "`max_tokens`"),
    ("max_tokens missing", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}, "`max_tokens`"),
    ("messages missing", {"model": "m", "max_tokens": 5}, "`messages`"),
    ("messages empty", valid_body(messages=[]), "`messages`"),
    ("messages not a list", valid_body(messages="Hi"), "`messages`"),
    ("bad role", valid_body(messages=[{"role": "system", "content": "Hi"}]), "messages[0] needs a `role`"),
    ("message not an object", valid_body(messages=["Hi"]), "messages[0] needs a `role`"),
    ("bad content type", valid_body(messages=[{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": 7}]), "messages[1] needs `content`"),
    ("system wrong type", valid_body(system={"text": "be nice"}), "`system`"),
    ("tools wrong type", valid_body(tools={"name": "t"}), "`tools`"),
    ("stream not a bool", valid_body(stream="yes"), "`stream`"),
]


@pytest.mark.parametrize("body, expected", [(b, e) for _, b, e in INVALID_BODIES],
                         ids=[name for name, _, _ in INVALID_BODIES])
def test_invalid_body_is_an_invalid_line_naming_line_and_reason(body, expected):
    result = app.parse_request_line(line(body), 12)
    assert isinstance(result, app.InvalidLine)
    assert result.line_number == 12
    assert expected in result.reason
    assert app.validate_request_body(body) == result.reason
    assert result.result_line() == [body, [f"line 12: {result.reason}"]]


def test_valid_body_with_optional_fields_passes_validation():
    body = valid_body(system=[{"type": "text", "text": "be nice"}], tools=[], stream=False)
    assert app.validate_request_body(body) is None


def test_metadata_is_removed_from_the_body_and_kept():
    job = app.parse_request_line(line(valid_body(metadata={"row_id": 17})), 1)
    assert "metadata" not in job.body
    assert job.metadata == {"row_id": 17}


@pytest.mark.parametrize("metadata", [{}, None], ids=["empty object", "null"])
def test_empty_or_null_metadata_is_still_kept(metadata):
    job = app.parse_request_line(line(valid_body(metadata=metadata)), 1)
    assert "metadata" not in job.body
    assert job.metadata == metadata
    assert job.result_line({"type": "message"}) == [valid_body(), {"type": "message"}, metadata]


def test_line_without_metadata_has_the_no_metadata_marker():
    job = app.parse_request_line(line(valid_body()), 1)
    assert job.metadata is app.NO_METADATA


def test_byte_order_mark_at_the_start_is_ignored():
    job = app.parse_request_line(b"\xef\xbb\xbf" + line(valid_body()), 1)
    assert isinstance(job, app.Job)
    assert job.body == valid_body()


def test_body_over_32_mb_is_refused_before_sending():
    prefix = b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "'
    raw = prefix + b"a" * (app.MAX_REQUEST_BYTES + 10) + b'"}]}\n'
    result = app.parse_request_line(raw, 9)
    assert isinstance(result, app.InvalidLine)
    assert result.line_number == 9
    assert "over the service's limit" in result.reason


def test_invalid_line_keeps_its_metadata_in_the_failure_line():
    body = valid_body(max_tokens=0)
    result = app.parse_request_line(line(dict(body, metadata={"id": "a"})), 2)
    assert result.result_line() == [body, [f"line 2: {result.reason}"], {"id": "a"}]


def test_invalid_line_result_has_two_elements_without_metadata():
    invalid = app.InvalidLine(4, "broken", "raw text")
    assert invalid.result_line() == ["raw text", ["line 4: broken"]]


def test_job_result_line_leaves_out_absent_metadata():
    job = app.Job(line_number=1, body=valid_body())
    assert job.result_line(["error", "e2"]) == [valid_body(), ["error", "e2"]]


def test_job_result_line_appends_metadata_when_present():
    job = app.Job(line_number=1, body=valid_body(), metadata={"k": 1})
    assert job.result_line({"type": "message"}) == [valid_body(), {"type": "message"}, {"k": 1}]


def test_read_jobs_numbers_lines_as_in_the_file_and_skips_blank_ones(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(line(valid_body()) + b"\n" + b"not json\n" + b"   \n"
                     + line(valid_body(metadata={"n": 5})) + line(valid_body(max_tokens=0)).rstrip(b"\n"))
    items = list(app.read_jobs(path))
    assert [item.line_number for item in items] == [1, 3, 5, 6]
    assert [type(item).__name__ for item in items] == ["Job", "InvalidLine", "Job", "InvalidLine"]
    assert items[2].metadata == {"n": 5}


@pytest.mark.parametrize("content, expected", [
    (b"", 0),
    (b"a\nb\nc\n", 3),
    (b"a\nb\nc", 3),
    (b"\n\n", 2),
], ids=["empty", "trailing newline", "no trailing newline", "only newlines"])
def test_count_lines(tmp_path, content, expected):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    assert app.count_lines(path) == expected


# ======================================================================================================
# 4. Token estimation
# ======================================================================================================


def png(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", width, height) + b"\x08\x02\x00\x00\x00" + b"\0" * 8


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\xf7\x00\x00" + b"\0" * 8


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xda" + b"\0" * 16


def webp_vp8(width: int, height: int) -> bytes:
    frame = b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
    return b"RIFF" + struct.pack("<I", 100) + b"WEBP" + b"VP8 " + struct.pack("<I", 80) + b"\x10\x02\x00" + frame + b"\0" * 8


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    return b"RIFF" + struct.pack("<I", 100) + b"WEBP" + b"VP8L" + struct.pack("<I", 80) + b"\x2f" \
        + bits.to_bytes(4, "little") + b"\0" * 8


def webp_vp8x(width: int, height: int) -> bytes:
    return b"RIFF" + struct.pack("<I", 100) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 \
        + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little") + b"\0" * 8


IMAGE_FORMATS = {"png": ("image/png", png), "gif": ("image/gif", gif), "jpeg": ("image/jpeg", jpeg),
                 "webp-vp8": ("image/webp", webp_vp8), "webp-vp8l": ("image/webp", webp_vp8l),
                 "webp-vp8x": ("image/webp", webp_vp8x)}

# (width, height) -> tokens, worked out by hand: ceil(w * h / 750) after scaling the long edge to 1568,
# and at most IMAGE_MAX_TOKENS (1600).
IMAGE_SIZES = [
    ((200, 300), 80),  # 60,000 / 750
    ((1000, 1000), 1334),  # 1,000,000 / 750 = 1333.3
    ((3136, 784), 820),  # scaled by 1/2 to 1568 x 392: 614,656 / 750 = 819.5
    ((4000, 3000), 1600),  # scaled to 1568 x 1176: 2458.6, over the cap
]


def image_block(media_type: str, data: bytes) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode()}}


@pytest.mark.parametrize("fmt", list(IMAGE_FORMATS))
@pytest.mark.parametrize("size, tokens", IMAGE_SIZES, ids=[f"{w}x{h}" for (w, h), _ in IMAGE_SIZES])
def test_base64_image_costs_its_area_over_750_after_downscaling(fmt, size, tokens):
    media_type, build = IMAGE_FORMATS[fmt]
    assert app.image_size_from_base64(base64.b64encode(build(*size)).decode()) == size
    assert app.block_tokens(image_block(media_type, build(*size)), words) == tokens


def test_image_by_url_costs_the_maximum():
    block = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    assert app.block_tokens(block, words) == app.IMAGE_MAX_TOKENS


def test_image_of_unknown_format_costs_the_maximum():
    assert app.block_tokens(image_block("image/png", b"not an image at all"), words) == app.IMAGE_MAX_TOKENS


def test_text_block_is_counted_with_the_tokenizer():
    assert app.block_tokens({"type": "text", "text": "one two three"}, words) == 3


def test_text_document_counts_its_text_and_title():
    block = {"type": "document", "title": "Annual report",
             "source": {"type": "text", "media_type": "text/plain", "data": "one two three four"}}
    assert app.block_tokens(block, words) == 4 + 2


@pytest.mark.parametrize("pages", [1, 3])
def test_base64_pdf_costs_per_page_object(pages):
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" \
          + b"2 0 obj << /Type /Pages /Count %d >> endobj\n" % pages \
          + b"".join(b"%d 0 obj << /Type /Page /Parent 2 0 R >> endobj\n" % (3 + i) for i in range(pages)) \
          + b"%%EOF\n"
    block = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": base64.b64encode(pdf).decode()}}
    assert app.block_tokens(block, words) == pages * app.PDF_TOKENS_PER_PAGE


def test_pdf_by_url_costs_the_unknown_page_count():
    block = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    assert app.block_tokens(block, words) == app.PDF_UNKNOWN_PAGES * app.PDF_TOKENS_PER_PAGE


def test_tool_use_block_counts_name_and_input():
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    assert app.block_tokens(block, words) == 4 + 1 + words(json.dumps({"city": "Paris"}))


def test_tool_result_with_string_content():
    block = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny and warm"}
    assert app.block_tokens(block, words) == 4 + 3


def test_tool_result_with_block_content():
    block = {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "sunny and warm"}, image_block("image/png", png(200, 300))]}
    assert app.block_tokens(block, words) == 4 + 3 + 80


def test_thinking_block_counts_its_thinking():
    block = {"type": "thinking", "thinking": "let me think about it", "signature": "abc"}
    assert app.block_tokens(block, words) == 5


def test_request_total_counts_tools_system_and_every_message():
    tool = {"name": "get_weather", "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    body = valid_body(
        tools=[tool],
        system="You are terse",
        messages=[{"role": "user", "content": "What is the weather"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me check"}]}])
    expected = (app.PER_REQUEST_OVERHEAD_TOKENS + app.TOOL_USE_SYSTEM_PROMPT_TOKENS["auto"]
                + words(json.dumps(tool)) + 3 + 2 * app.PER_MESSAGE_OVERHEAD_TOKENS + 4 + 3)
    estimate = app.estimate_input_tokens(body, words)
    assert estimate.total == expected
    # The tool-use system prompt follows the service's table, not our tokenizer: it is not corrected.
    assert estimate.fixed == app.TOOL_USE_SYSTEM_PROMPT_TOKENS["auto"]


def test_system_as_blocks_is_counted():
    body = valid_body(system=[{"type": "text", "text": "You are terse"}, {"type": "text", "text": "Be kind"}])
    with_blocks = app.estimate_input_tokens(body, words).total
    without = app.estimate_input_tokens(valid_body(), words).total
    assert with_blocks - without == 5


# ----- cached prefixes --------------------------------------------------------------------------------

EPHEMERAL = {"type": "ephemeral"}


def cached_request(question: str, document: str = "a long shared document", model: str = "claude-sonnet-4-5"):
    return {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": document, "cache_control": EPHEMERAL},
        {"type": "text", "text": question}]}]}


def test_no_cache_control_means_no_prefix():
    estimate = app.estimate_input_tokens(valid_body(), words, track_cache_prefix=True)
    assert estimate.cached_prefix == 0
    assert estimate.prefix_key is None


def test_prefix_not_tracked_unless_asked():
    estimate = app.estimate_input_tokens(cached_request("Summarise it"), words)
    assert estimate.prefix_key is None
    assert estimate.cached_prefix == 0


def test_cache_control_on_a_message_block_marks_the_prefix():
    estimate = app.estimate_input_tokens(cached_request("Summarise it please"), words, track_cache_prefix=True)
    prefix = app.PER_REQUEST_OVERHEAD_TOKENS + app.PER_MESSAGE_OVERHEAD_TOKENS + 4
    assert estimate.cached_prefix == prefix
    assert estimate.total == prefix + 3
    assert estimate.prefix_key


def test_requests_sharing_a_prefix_share_its_key():
    first = app.estimate_input_tokens(cached_request("Summarise it"), words, track_cache_prefix=True)
    second = app.estimate_input_tokens(cached_request("List the key dates and names"), words, track_cache_prefix=True)
    assert first.prefix_key == second.prefix_key
    assert first.cached_prefix == second.cached_prefix
    assert first.total != second.total


def test_different_prefixes_have_different_keys():
    first = app.estimate_input_tokens(cached_request("Q", document="document one"), words, track_cache_prefix=True)
    second = app.estimate_input_tokens(cached_request("Q", document="document two"), words, track_cache_prefix=True)
    assert first.prefix_key != second.prefix_key


def test_same_prefix_for_different_models_has_different_keys():
    first = app.estimate_input_tokens(cached_request("Q", model="claude-sonnet-4-5"), words, track_cache_prefix=True)
    second = app.estimate_input_tokens(cached_request("Q", model="claude-haiku-4-5"), words, track_cache_prefix=True)
    assert first.prefix_key != second.prefix_key


def test_cache_control_on_a_tool_marks_the_prefix_at_the_tools():
    tools = [{"name": "a", "description": "first tool", "input_schema": {"type": "object"}},
             {"name": "b", "description": "second tool", "input_schema": {"type": "object"}, "cache_control": EPHEMERAL}]
    body = valid_body(tools=tools, messages=[{"role": "user", "content": "one two"}])
    estimate = app.estimate_input_tokens(body, words, track_cache_prefix=True)
    described_b = {k: v for k, v in tools[1].items() if k != "cache_control"}
    assert estimate.cached_prefix == (app.PER_REQUEST_OVERHEAD_TOKENS + app.TOOL_USE_SYSTEM_PROMPT_TOKENS["auto"]
                                      + words(json.dumps(tools[0])) + words(json.dumps(described_b)))
    other = app.estimate_input_tokens(dict(body, messages=[{"role": "user", "content": "three"}]), words,
                                      track_cache_prefix=True)
    assert other.prefix_key == estimate.prefix_key


def test_cache_control_on_a_system_block_marks_the_prefix_at_the_system_prompt():
    system = [{"type": "text", "text": "You are a careful analyst", "cache_control": EPHEMERAL}]
    estimate = app.estimate_input_tokens(valid_body(system=system), words, track_cache_prefix=True)
    assert estimate.cached_prefix == app.PER_REQUEST_OVERHEAD_TOKENS + 5
    changed = app.estimate_input_tokens(valid_body(system=system, messages=[{"role": "user", "content": "Other"}]),
                                        words, track_cache_prefix=True)
    assert changed.prefix_key == estimate.prefix_key
    other_system = [{"type": "text", "text": "You are a poet", "cache_control": EPHEMERAL}]
    assert app.estimate_input_tokens(valid_body(system=other_system), words,
                                     track_cache_prefix=True).prefix_key != estimate.prefix_key


def test_prefix_ends_at_the_last_cache_control():
    system = [{"type": "text", "text": "You are terse", "cache_control": EPHEMERAL}]
    body = cached_request("Question here")
    body["system"] = system
    estimate = app.estimate_input_tokens(body, words, track_cache_prefix=True)
    assert estimate.cached_prefix == app.PER_REQUEST_OVERHEAD_TOKENS + 3 + app.PER_MESSAGE_OVERHEAD_TOKENS + 4


# ----- tokenizers -------------------------------------------------------------------------------------


def test_byte_estimate_is_about_four_characters_a_token_for_ascii():
    text = "The quick brown fox jumps over the lazy dog. " * 40
    assert app.count_tokens_by_bytes(text) == pytest.approx(len(text) / 4, rel=0.02)


def test_byte_estimate_counts_cjk_text_as_about_a_token_per_character():
    text = "東京は日本の首都です" * 30
    tokens = app.count_tokens_by_bytes(text)
    assert tokens > len(text) / 4 * 3
    assert tokens == pytest.approx(len(text), rel=0.3)


def test_byte_estimate_of_empty_text_is_zero():
    assert app.count_tokens_by_bytes("") == 0


def test_tokenizer_falls_back_to_byte_estimate_with_one_warning(monkeypatch, warnings_logged):
    import tiktoken

    def unavailable(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", unavailable)
    count, description = app.load_tokenizer()
    assert count is app.count_tokens_by_bytes
    assert description == "byte estimate"
    assert len(warnings_logged) == 1
    assert warnings_logged[0]["level"].name == "WARNING"
    assert "ConnectionError" in warnings_logged[0]["message"]


def test_tokenizer_falls_back_when_loading_hangs(monkeypatch, warnings_logged):
    import tiktoken

    release = threading.Event()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: release.wait(5))
    try:
        count, description = app.load_tokenizer(timeout_seconds=0)
    finally:
        release.set()
    assert count is app.count_tokens_by_bytes
    assert description == "byte estimate"
    assert len(warnings_logged) == 1
    assert "no answer within" in warnings_logged[0]["message"]


def test_tokenizer_uses_tiktoken_when_it_loads(monkeypatch, warnings_logged):
    import tiktoken

    byte_encoding = tiktoken.Encoding(name="bytes_only", pat_str=r"\S+|\s+",
                                      mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    asked = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or byte_encoding)
    count, description = app.load_tokenizer()
    assert asked == ["cl100k_base"]
    assert description == "tiktoken cl100k_base"
    assert count("hello") == 5
    assert count("héllo wörld") == len("héllo wörld".encode())
    assert warnings_logged == []


# ----- the estimator ----------------------------------------------------------------------------------

MODEL = "claude-sonnet-4-5"


def test_uncalibrated_input_charge_is_generous():
    estimator = app.Estimator(words)
    assert estimator.input_charge(MODEL, 1000) == 1000 * app.UNCALIBRATED_INPUT_FACTOR
    assert estimator.corrected(MODEL, 1000) == 1000 * app.UNCALIBRATED_INPUT_FACTOR


def test_output_charge_is_max_tokens_before_any_answer():
    assert app.Estimator(words).output_charge(MODEL, 4096) == 4096


def test_output_charge_follows_the_answers_seen_capped_at_max_tokens():
    estimator = app.Estimator(words)
    for _ in range(200):
        estimator.learn(MODEL, app.InputEstimate(text=1000), 1000, 300)
    # The mean (the deviation is nil here), with what is left of the max_tokens prior.
    assert 300 <= estimator.output_charge(MODEL, 4096) <= 300 + 4096 * 4 / 204 + 1
    assert estimator.output_charge(MODEL, 100) == 100


def test_output_charge_allows_for_the_spread_of_answers():
    estimator = app.Estimator(words)
    rng = random.Random(3)
    for _ in range(300):
        estimator.learn(MODEL, app.InputEstimate(text=1000), 1000, rng.randint(100, 700))
    # Mean 400, mean deviation about 150: the reservation covers most answers, not just the average.
    assert 500 <= estimator.output_charge(MODEL, 4096) <= 650


def test_output_charge_leans_on_max_tokens_while_few_answers_have_arrived():
    estimator = app.Estimator(words)
    estimator.learn(MODEL, app.InputEstimate(text=1000), 1000, 10)  # the first answers are the short ones
    assert estimator.output_charge(MODEL, 1000) >= 800


def test_estimator_learns_the_models_correction_from_answers():
    rng = random.Random(1234)
    estimator = app.Estimator(words)
    for _ in range(100):
        raw = rng.randint(200, 5000)
        estimator.learn(MODEL, app.InputEstimate(text=raw), round(1.3 * raw * rng.uniform(0.95, 1.05)), 200)
    for raw in (150, 1000, 7777, 20_000):
        assert estimator.corrected(MODEL, raw) == pytest.approx(1.3 * raw, rel=0.10)
    # Its charge adds a margin for the remaining error, but stays near the truth.
    assert 1.3 * 1000 <= estimator.input_charge(MODEL, 1000) <= 1.3 * 1000 * 1.5


def test_image_tokens_follow_the_published_rule_and_are_not_scaled_by_the_text_correction():
    estimator = app.Estimator(words)
    for _ in range(50):  # text counts 1.3x ours; a 1,000-token image counts exactly its pixel rule
        estimator.learn(MODEL, app.InputEstimate(text=500, fixed=1000), round(1.3 * 500) + 1000, 10)
    assert estimator.calibration(MODEL).correction == pytest.approx(1.3, rel=0.01)
    assert estimator.corrected(MODEL, 500, 1000) == pytest.approx(650 + 1000, rel=0.01)
    assert estimator.corrected(MODEL, 0, 1600) == 1600


def test_calibration_is_kept_per_model():
    estimator = app.Estimator(words)
    estimator.learn("claude-haiku-4-5", app.InputEstimate(text=1000), 1500, 10)
    assert estimator.corrected(MODEL, 1000) == 1000 * app.UNCALIBRATED_INPUT_FACTOR


@pytest.mark.parametrize("ratio, bound", [(20.0, 1), (0.05, 0)], ids=["upper bound", "lower bound"])
def test_correction_is_bounded(ratio, bound):
    estimator = app.Estimator(words)
    for _ in range(30):
        estimator.learn(MODEL, app.InputEstimate(text=1000), round(1000 * ratio), 10)
    assert estimator.calibration(MODEL).correction == app.CORRECTION_FACTOR_BOUNDS[bound]
    assert estimator.corrected(MODEL, 1000) == math.ceil(1000 * app.CORRECTION_FACTOR_BOUNDS[bound])


# ======================================================================================================
# 5. Rate limiting
# ======================================================================================================


def test_bucket_starts_full():
    bucket = app.TokenBucket(60, 1, now=0)
    assert bucket.level(0) == 60
    assert bucket.seconds_until(60, 0) == 0


def test_bucket_take_and_give_back():
    bucket = app.TokenBucket(60, 1, now=0)
    bucket.take(50, 0)
    assert bucket.level(0) == 10
    bucket.give_back(20, 0)
    assert bucket.level(0) == 30


def test_give_back_never_overfills_the_bucket():
    bucket = app.TokenBucket(60, 1, now=0)
    bucket.take(10, 0)
    bucket.give_back(100, 0)
    assert bucket.level(0) == 60


def test_bucket_refills_over_time_up_to_capacity():
    bucket = app.TokenBucket(60, 1, now=100)
    bucket.take(60, 100)
    assert bucket.level(110) == 10
    assert bucket.level(130) == 30
    assert bucket.level(1000) == 60


def test_seconds_until_is_exact():
    bucket = app.TokenBucket(600, 10, now=0)
    bucket.take(600, 0)
    assert bucket.seconds_until(25, 0) == 2.5
    assert bucket.seconds_until(10, 0.5) == 0.5
    assert bucket.seconds_until(25, 2.5) == 0


def test_need_above_capacity_waits_for_a_full_bucket():
    bucket = app.TokenBucket(60, 1, now=0)
    bucket.take(60, 0)
    assert bucket.seconds_until(1000, 0) == 60
    assert bucket.seconds_until(1000, 60) == 0


def test_negative_level_refills_from_below():
    bucket = app.TokenBucket(60, 1, now=0)
    bucket.take(100, 0)
    assert bucket.level(0) == -40
    assert bucket.seconds_until(10, 0) == 50
    assert bucket.level(10) == -30


def test_set_rate_keeps_the_level_so_a_higher_limit_ramps_up():
    bucket = app.TokenBucket(60, 1, now=0)
    bucket.take(60, 0)
    bucket.set_rate(600, 0)
    assert bucket.level(0) == 0
    assert bucket.capacity == 600
    assert bucket.level(1) == 10
    assert bucket.seconds_until(600, 1) == 59


def test_set_rate_to_a_lower_limit_never_leaves_more_than_the_new_capacity():
    bucket = app.TokenBucket(600, 10, now=0)
    bucket.set_rate(60, 0)
    assert bucket.level(0) <= 60


def limits(requests=60, input_tokens=6000, output_tokens=600, auto=False) -> dict:
    return {"requests": app.LimitSetting(requests, auto), "input-tokens": app.LimitSetting(input_tokens, auto),
            "output-tokens": app.LimitSetting(output_tokens, auto)}


def full_bucket_loss(per_minute: float) -> float:
    """What a take from a full bucket also removes: the refill the service may lose meanwhile."""
    return per_minute / 60 * app.ARRIVAL_ALLOWANCE_SECONDS


def test_a_take_from_a_full_bucket_also_charges_what_the_service_may_lose_in_transit():
    bucket = app.TokenBucket(60, 1, now=0, arrival_allowance_seconds=0.5)
    bucket.take(10, 0)
    assert bucket.level(0) == 60 - 10 - 0.5
    bucket.take(10, 0)  # far from full: nothing more is lost
    assert bucket.level(0) == 60 - 20 - 0.5


def test_limiter_waits_for_the_slowest_of_its_three_buckets():
    limiter = app.Limiter(limits(60, 6000, 600), now=0)  # refills 1, 100 and 10 per second
    limiter.take(app.Need(60, 6000, 600), 0)
    extra = app.ARRIVAL_ALLOWANCE_SECONDS  # each bucket was full: half a second of refill more
    assert limiter.seconds_until_admissible(app.Need(1, 500, 100), 0) == 10 + extra  # output: 100 at 10/s
    assert limiter.seconds_until_admissible(app.Need(1, 1500, 10), 0) == 15 + extra  # input: 1500 at 100/s
    assert limiter.seconds_until_admissible(app.Need(5, 100, 10), 0) == 5 + extra  # requests: 5 at 1/s


def test_limiter_admits_at_once_when_all_buckets_hold_enough():
    limiter = app.Limiter(limits(), now=0)
    assert limiter.seconds_until_admissible(app.Need(1, 1000, 100), 0) == 0


def test_limiter_pause_after_a_429_holds_everything():
    limiter = app.Limiter(limits(), now=0)
    limiter.pause(30)
    assert limiter.seconds_until_admissible(app.Need(1, 1, 1), 0) == 30
    limiter.pause(10)  # a shorter pause does not shorten the longer one
    assert limiter.seconds_until_admissible(app.Need(1, 1, 1), 20) == 10


def test_settle_takes_more_when_the_answer_used_more():
    limiter = app.Limiter(limits(), now=0)
    limiter.take(app.Need(1, 1000, 100), 0)
    limiter.settle("input-tokens", 1000, 1500, 0)
    assert limiter.buckets["input-tokens"].level(0) == 6000 - 1500 - full_bucket_loss(6000)


def test_settle_gives_back_when_the_answer_used_less():
    limiter = app.Limiter(limits(), now=0)
    limiter.take(app.Need(1, 1000, 100), 0)
    limiter.settle("output-tokens", 100, 30, 0)
    assert limiter.buckets["output-tokens"].level(0) == 600 - 30 - full_bucket_loss(600)


def test_auto_limit_adopts_95_percent_of_the_advertised_limit():
    limiter = app.Limiter(limits(40, 16000, 6400, auto=True), now=0)
    notices = limiter.observe_headers({"anthropic-ratelimit-requests-limit": "1000",
                                       "anthropic-ratelimit-input-tokens-limit": "400000",
                                       "anthropic-ratelimit-output-tokens-limit": "80000"}, 0)
    assert notices == []
    assert limiter.buckets["requests"].capacity == pytest.approx(950)
    assert limiter.buckets["requests"].refill_per_second == pytest.approx(950 / 60)
    assert limiter.buckets["input-tokens"].capacity == pytest.approx(380_000)
    assert limiter.buckets["output-tokens"].capacity == pytest.approx(76_000)
    assert limiter.buckets["requests"].level(0) == 40  # ramps up, no burst


def test_numeric_limit_is_kept_and_a_much_higher_advertised_limit_is_noticed_once():
    limiter = app.Limiter(limits(40, 16000, 6400), now=0)
    headers = {"anthropic-ratelimit-requests-limit": "100"}
    notices = limiter.observe_headers(headers, 0)
    assert len(notices) == 1
    assert "100" in notices[0] and "auto" in notices[0]
    assert limiter.observe_headers(headers, 1) == []
    assert limiter.buckets["requests"].capacity == 40


def test_advertised_limit_below_twice_ours_gives_no_notice():
    limiter = app.Limiter(limits(40, 16000, 6400), now=0)
    assert limiter.observe_headers({"anthropic-ratelimit-requests-limit": "79",
                                    "anthropic-ratelimit-input-tokens-limit": "20000"}, 0) == []


def input_remaining(value: float) -> dict:
    return {"anthropic-ratelimit-input-tokens-remaining": str(value)}


def test_bucket_is_lowered_when_the_service_says_clearly_less_remains():
    # Another process shares the limit: the service has 40,000 left where our books say 90,000.
    limiter = app.Limiter(limits(1000, 100_000, 100_000), now=0)
    limiter.take(app.Need(1, 5000, 100), 0)
    limiter.take(app.Need(1, 5000, 100), 0)
    limiter.observe_headers(input_remaining(40_000), 0)
    bucket = limiter.buckets["input-tokens"]
    assert bucket.available(0) == 40_000
    # Handed out over a ramp, not at once: the others spend from those 40,000 too.
    assert bucket.level(0) == 0
    assert bucket.level(app.RAMP_UP_SECONDS) == pytest.approx(40_000 + app.RAMP_UP_SECONDS * bucket.refill_per_second)


def test_bucket_is_never_raised_by_the_service_headers():
    limiter = app.Limiter(limits(1000, 100_000, 100_000), now=0)
    limiter.take(app.Need(1, 5000, 100), 0)
    before = limiter.buckets["input-tokens"].level(0)
    limiter.observe_headers(input_remaining(100_000), 0)
    assert limiter.buckets["input-tokens"].level(0) == before


def test_bucket_is_not_lowered_for_a_small_difference_such_as_rounding():
    limiter = app.Limiter(limits(1000, 100_000, 100_000), now=0)
    limiter.take(app.Need(1, 5000, 100), 0)
    before = limiter.buckets["input-tokens"].level(0)  # about 94,167
    limiter.observe_headers(input_remaining(94_000), 0)  # rounded down to the thousand
    assert limiter.buckets["input-tokens"].level(0) == before


# ======================================================================================================
# 6. Classifying answers
# ======================================================================================================


def message(**changes) -> dict:
    payload = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 3}}
    payload.update(changes)
    return payload


def error_body(error_type: str, text: str = "something", **error_fields) -> bytes:
    return json.dumps({"type": "error", "error": {"type": error_type, "message": text, **error_fields}}).encode()


HTML = b"<html><head><title>Bad gateway</title></head><body><h1>502</h1></body></html>"


def test_200_with_a_valid_message_is_a_success():
    raw = json.dumps(message()).encode()
    outcome = app.classify(200, {}, raw)
    assert outcome == app.Success(message(), raw)  # the raw answer is kept, to be written as received


def test_200_with_truncated_json_is_retried():
    outcome = app.classify(200, {}, json.dumps(message()).encode()[:40])
    assert isinstance(outcome, app.Retry)
    assert outcome.kind == "malformed"


def test_200_without_content_is_retried():
    payload = message()
    del payload["content"]
    assert isinstance(app.classify(200, {}, json.dumps(payload).encode()), app.Retry)


def test_429_with_retry_after_is_a_rate_limited_retry_after_that_delay():
    outcome = app.classify(429, {"retry-after": "7"}, error_body("rate_limit_error", "slow down"))
    assert isinstance(outcome, app.Retry)
    assert outcome.rate_limited
    assert outcome.after_seconds == 7
    assert outcome.kind == "rate_limit"


def test_429_spend_limit_without_retry_after_aborts_the_run():
    body = error_body("rate_limit_error", "You have reached your spend limit",
                      details={"error_code": "enforced_spend_limit_reached"})
    outcome = app.classify(429, {}, body)
    assert isinstance(outcome, app.Abort)
    assert "spend limit" in outcome.reason


def test_401_aborts_with_advice_about_the_key():
    outcome = app.classify(401, {}, error_body("authentication_error", "invalid x-api-key"))
    assert isinstance(outcome, app.Abort)
    assert outcome.reason.startswith("API key rejected (401 authentication_error): check ANTHROPIC_API_KEY")


@pytest.mark.parametrize("status, error_type", [(402, "billing_error"), (403, "permission_error")])
def test_billing_and_permission_errors_abort(status, error_type):
    outcome = app.classify(status, {}, error_body(error_type))
    assert isinstance(outcome, app.Abort)
    assert f"({status} {error_type})" in outcome.reason


@pytest.mark.parametrize("status, body", [
    (400, error_body("invalid_request_error", "max_tokens: too large")),
    (404, error_body("not_found_error", "model: claude-nope")),
    (413, b"<html><body><h1>413 Request Entity Too Large</h1></body></html>"),
], ids=["400", "404", "413 html"])
def test_requests_the_service_will_always_refuse_fail_at_once(status, body):
    outcome = app.classify(status, {}, body)
    assert isinstance(outcome, app.Fail)
    assert outcome.reason.startswith(str(status))


@pytest.mark.parametrize("status, body", [
    (408, error_body("timeout_error")),
    (409, error_body("conflict_error")),
    (500, error_body("api_error")),
    (502, HTML),
    (503, b""),
    (504, error_body("timeout_error")),
    (529, error_body("overloaded_error", "Overloaded")),
], ids=["408", "409", "500", "502 html", "503 empty", "504", "529"])
def test_transient_errors_are_retried(status, body):
    outcome = app.classify(status, {}, body)
    assert isinstance(outcome, app.Retry)
    assert not outcome.rate_limited


def test_overloaded_is_counted_as_its_own_kind():
    assert app.classify(529, {}, error_body("overloaded_error")).kind == "overloaded"


def test_should_retry_header_true_makes_a_400_retryable():
    outcome = app.classify(400, {"x-should-retry": "true"}, error_body("invalid_request_error"))
    assert isinstance(outcome, app.Retry)


def test_should_retry_header_false_makes_a_500_fail():
    outcome = app.classify(500, {"x-should-retry": "false"}, error_body("api_error"))
    assert isinstance(outcome, app.Fail)


def test_retry_after_ms_wins_over_retry_after():
    assert app.parse_retry_after({"retry-after-ms": "1500", "retry-after": "30"}) == 1.5


def test_retry_after_seconds_may_have_decimals():
    assert app.parse_retry_after({"retry-after": "2.25"}) == 2.25


def test_retry_after_as_an_http_date():
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    now_wall = email.utils.parsedate_to_datetime(date).timestamp() - 12
    assert app.parse_retry_after({"retry-after": date}, now_wall=now_wall) == pytest.approx(12)


def test_retry_after_date_in_the_past_means_now():
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    now_wall = email.utils.parsedate_to_datetime(date).timestamp() + 100
    assert app.parse_retry_after({"retry-after": date}, now_wall=now_wall) == 0


@pytest.mark.parametrize("headers", [{}, {"retry-after": "soon"}, {"retry-after": ""}, {"retry-after-ms": "x"}],
                         ids=["absent", "garbage", "empty", "garbage ms"])
def test_unreadable_retry_after_is_none(headers):
    assert app.parse_retry_after(headers) is None


def test_backoff_doubles_within_half_to_full_of_its_ceiling():
    rng = random.Random(42)
    for attempt in range(1, 12):
        ceiling = min(60, 2 ** (attempt - 1))
        for _ in range(50):
            assert 0.5 * ceiling <= app.backoff_seconds(attempt, rng) <= ceiling


def test_backoff_is_capped_at_60_seconds():
    rng = random.Random(7)
    delays = [app.backoff_seconds(attempt, rng) for attempt in (8, 20, 50) for _ in range(30)]
    assert max(delays) <= 60
    assert min(delays) >= 30


def test_backoff_survives_a_very_large_attempt_number():
    assert 30 <= app.backoff_seconds(2000, random.Random(1)) <= 60


# ======================================================================================================
# 7. Streaming
# ======================================================================================================


def sse_events() -> list[tuple[str, dict]]:
    def delta(index, **fields):
        return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": fields})

    return [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": MODEL, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "thinking", "thinking": ""}}),
        delta(0, type="thinking_delta", thinking="The user wants "),
        delta(0, type="thinking_delta", thinking="the weather."),
        delta(0, type="signature_delta", signature="EqQBCgIYAhIM"),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "text", "text": ""}}),
        delta(1, type="text_delta", text="Let me "),
        ("ping", {"type": "ping"}),
        delta(1, type="text_delta", text="check "),
        delta(1, type="text_delta", text="that."),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
            "type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}}),
        delta(2, type="input_json_delta", partial_json=""),
        delta(2, type="input_json_delta", partial_json='{"city": "Pa'),
        delta(2, type="input_json_delta", partial_json='ris", "unit'),
        delta(2, type="input_json_delta", partial_json='": "celsius"}'),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 89}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def test_assembler_rebuilds_the_message_from_server_sent_events():
    assembler = app.MessageAssembler()
    for event, data in sse_events():
        assembler.feed(event, json.dumps(data))
    assert assembler.finished
    assert assembler.result() == {
        "id": "msg_01", "type": "message", "role": "assistant", "model": MODEL,
        "content": [
            {"type": "thinking", "thinking": "The user wants the weather.", "signature": "EqQBCgIYAhIM"},
            {"type": "text", "text": "Let me check that."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
             "input": {"city": "Paris", "unit": "celsius"}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 89},
    }


def test_error_event_in_a_stream_raises_stream_error():
    assembler = app.MessageAssembler()
    events = sse_events()
    assembler.feed(events[0][0], json.dumps(events[0][1]))
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(app.StreamError) as caught:
        assembler.feed("error", json.dumps(error))
    assert caught.value.payload == error


def test_result_before_message_stop_raises():
    assembler = app.MessageAssembler()
    for event, data in sse_events()[:-1]:
        assembler.feed(event, json.dumps(data))
    with pytest.raises(ValueError):
        assembler.result()


def test_event_before_message_start_raises():
    with pytest.raises(ValueError):
        app.MessageAssembler().feed("content_block_start", json.dumps(sse_events()[1][1]))


@pytest.mark.parametrize("max_tokens, streams", [(1024, False), (7111, False), (7112, True), (64_000, True)])
def test_auto_streams_only_answers_that_may_take_long(max_tokens, streams):
    # 128,000 output tokens an hour: above 200 s means max_tokens above 7,111.
    assert app.should_stream(valid_body(max_tokens=max_tokens), "auto") is streams


def test_always_and_never_stream_modes():
    assert app.should_stream(valid_body(max_tokens=10), "always") is True
    assert app.should_stream(valid_body(max_tokens=64_000), "never") is False


def test_body_asking_for_a_stream_is_streamed():
    assert app.should_stream(valid_body(stream=True), "auto") is True
    assert app.should_stream(valid_body(stream=True), "never") is True


def test_explicit_request_timeout_wins():
    assert app.non_streaming_timeout(64_000, 30.0) == 30.0


def test_default_timeout_is_600_seconds_and_grows_with_max_tokens():
    assert app.non_streaming_timeout(1024, None) == 600
    assert app.non_streaming_timeout(128_000, None) == 1.5 * 3600
    assert app.non_streaming_timeout(64_000, None) > app.non_streaming_timeout(32_000, None) > 600


# ======================================================================================================
# 8. Prices
# ======================================================================================================


@pytest.mark.parametrize("model, family", [
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-opus-4-20250514", "claude-opus-4"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("claude-3-haiku-20240307", "claude-3-haiku"),
    ("claude-haiku-4-5", "claude-haiku-4-5"),
])
def test_dated_model_ids_are_priced_as_their_family(model, family):
    assert app.prices_for(model) == app.PRICES_PER_MILLION[family]


@pytest.mark.parametrize("model", ["gpt-4o", "claude-2.1", "my-finetune"])
def test_unknown_model_has_no_price(model):
    assert app.prices_for(model) is None
    assert app.usage_cost(model, {"input_tokens": 10, "output_tokens": 10}) is None


USAGE_WITH_CACHE = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 3000,
                    "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 1000},
                    "cache_read_input_tokens": 10_000}


def test_cost_counts_input_both_cache_writes_reads_and_output():
    # Sonnet 4.5: $3 input, $3.75 5-minute write, $6 1-hour write, $0.30 read, $15 output per million.
    cost, saved = app.usage_cost("claude-sonnet-4-5-20250929", USAGE_WITH_CACHE)
    assert cost == pytest.approx((1000 * 3 + 2000 * 3.75 + 1000 * 6 + 10_000 * 0.30 + 500 * 15) / 1e6)
    assert saved == pytest.approx(((3000 + 10_000) * 3 - (2000 * 3.75 + 1000 * 6 + 10_000 * 0.30)) / 1e6)
    assert saved > 0


def test_batch_halves_the_cost():
    cost, saved = app.usage_cost("claude-sonnet-4-5", USAGE_WITH_CACHE)
    batch_cost, batch_saved = app.usage_cost("claude-sonnet-4-5", USAGE_WITH_CACHE, batch=True)
    assert batch_cost == pytest.approx(cost / 2)
    assert batch_saved == pytest.approx(saved / 2)


def test_cost_without_caching_saves_nothing():
    cost, saved = app.usage_cost("claude-haiku-4-5", {"input_tokens": 1_000_000, "output_tokens": 1_000_000})
    assert cost == pytest.approx(1.0 + 5.0)
    assert saved == 0


# ======================================================================================================
# 9. Results file
# ======================================================================================================


def test_fingerprint_depends_on_metadata():
    body = valid_body()
    assert app.request_fingerprint(body, {"id": 1}) != app.request_fingerprint(body, {"id": 2})
    assert app.request_fingerprint(body, None) != app.request_fingerprint(body, app.NO_METADATA)
    assert app.request_fingerprint(body, {}) != app.request_fingerprint(body, app.NO_METADATA)


def test_fingerprint_ignores_key_order():
    reordered = dict(reversed(list(valid_body().items())))
    assert app.request_fingerprint(valid_body(), app.NO_METADATA) == app.request_fingerprint(reordered, app.NO_METADATA)


def test_resume_index_matches_each_success_line_to_one_duplicate_request():
    fingerprint = app.request_fingerprint(valid_body(), app.NO_METADATA)
    other = app.request_fingerprint(valid_body(max_tokens=7), app.NO_METADATA)
    index = app.ResumeIndex(array("Q", [other, fingerprint, fingerprint]))
    assert [index.claim(fingerprint) for _ in range(3)] == [True, True, False]
    assert index.claim(other) is True
    assert len(index) == 3


def test_scan_save_file_counts_successes_failures_and_a_torn_last_line(tmp_path, warnings_logged):
    path = tmp_path / "results.jsonl"
    good = [valid_body(), message()]
    good_with_metadata = [valid_body(max_tokens=9), message(), {"row": 3}]
    failure = [valid_body(max_tokens=8), ["error one", "error two"]]
    invalid = ["not json", ["line 4: not valid JSON"]]
    complete = line(good) + line(good_with_metadata) + line(failure) + b"{garbage\n" + line(invalid)
    torn = b'[{"model": "claude-sonnet-4-5", "max_tok'
    path.write_bytes(complete + torn)

    scan = app.scan_save_file(path)
    assert sorted(scan.successes) == sorted([app.request_fingerprint(valid_body(), app.NO_METADATA),
                                             app.request_fingerprint(valid_body(max_tokens=9), {"row": 3})])
    assert scan.failure_lines == 2
    assert scan.valid_bytes == len(complete)
    assert scan.torn_bytes == len(torn)
    assert len(warnings_logged) == 1  # the unreadable line


def test_scan_of_a_file_that_is_only_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'[{"model": "m"}, {"type": "mess')
    scan = app.scan_save_file(path)
    assert (scan.valid_bytes, scan.torn_bytes, scan.failure_lines) == (0, path.stat().st_size, 0)


def test_scan_detects_a_torn_last_line_longer_than_one_mebibyte(tmp_path):
    path = tmp_path / "results.jsonl"
    complete = line([valid_body(), message()])
    torn = b'[{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (3 << 19)
    path.write_bytes(complete + torn)
    scan = app.scan_save_file(path)
    assert (scan.valid_bytes, scan.torn_bytes) == (len(complete), len(torn))


def test_scan_of_a_missing_save_file_is_empty(tmp_path):
    scan = app.scan_save_file(tmp_path / "absent.jsonl")
    assert (len(scan.successes), scan.failure_lines, scan.valid_bytes, scan.torn_bytes) == (0, 0, 0, 0)


def test_atomic_rewrite_keeps_the_selected_lines_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [line([valid_body(), message()]), line([valid_body(), ["error"]]), line([valid_body(), message()])]
    path.write_bytes(b"".join(lines))
    offsets = []

    def keep(raw: bytes, offset: int) -> bool:
        offsets.append(offset)
        return b'"type": "message"' in raw

    assert app.atomic_rewrite(path, keep) == 1
    assert path.read_bytes() == lines[0] + lines[2]
    assert offsets == [0, len(lines[0]), len(lines[0]) + len(lines[1])]
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


def test_atomic_rewrite_leaves_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"one\ntwo\n")

    def keep(raw: bytes, offset: int) -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        app.atomic_rewrite(path, keep)
    assert path.read_bytes() == b"one\ntwo\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


# ======================================================================================================
# 14. Command line
# ======================================================================================================

ORIGINAL_FLAGS = ["--requests_filepath", "--save_filepath", "--request_url", "--use_caching", "--api_key",
                  "--max_requests_per_minute", "--max_tokens_per_minute", "--max_attempts", "--logging_level"]


def parse(*argv: str):
    return app.build_parser().parse_args(["--requests_filepath", "in.jsonl", *argv])


def test_original_cookbook_command_line_parses():
    args = app.build_parser().parse_args([
        "--requests_filepath", "in.jsonl", "--save_filepath", "out.jsonl",
        "--request_url", "https://api.anthropic.com/v1/messages", "--use_caching", "False",
        "--api_key", "sk-ant-test", "--max_requests_per_minute", "40", "--max_tokens_per_minute", "16000",
        "--max_attempts", "5", "--logging_level", "INFO"])
    assert args.requests_filepath == "in.jsonl"
    assert args.save_filepath == "out.jsonl"
    assert args.use_caching is False
    assert args.api_key == "sk-ant-test"
    assert args.max_requests_per_minute == 40
    assert args.max_tokens_per_minute == 16000
    assert args.max_attempts == 5
    assert args.logging_level == 20


def test_defaults():
    args = parse()
    assert args.use_caching is False
    assert args.max_requests_per_minute == app.DEFAULT_MAX_REQUESTS_PER_MINUTE
    assert args.max_tokens_per_minute == app.DEFAULT_MAX_INPUT_TOKENS_PER_MINUTE
    assert args.max_output_tokens_per_minute == app.DEFAULT_MAX_OUTPUT_TOKENS_PER_MINUTE
    assert args.logging_level == 20
    assert args.stream == "auto"


@pytest.mark.parametrize("argv, expected", [
    (["--use_caching", "False"], False),
    (["--use_caching"], True),
    (["--use_caching", "true"], True),
    (["--use_caching", "True"], True),
    (["--use_caching", "1"], True),
    (["--use_caching", "0"], False),
], ids=["False", "bare", "true", "True", "1", "0"])
def test_use_caching_reads_booleans_honestly(argv, expected):
    assert parse(*argv).use_caching is expected


@pytest.mark.parametrize("value, level", [("10", 10), ("DEBUG", 10), ("debug", 10), ("WARNING", 30), ("5", 5)])
def test_logging_level_by_name_or_number(value, level):
    assert parse("--logging_level", value).logging_level == level


def test_logging_level_critical_from_the_original_still_parses():
    assert parse("--logging_level", "CRITICAL").logging_level == 50


def test_limits_accept_auto():
    args = parse("--max_requests_per_minute", "auto", "--max_tokens_per_minute", "AUTO",
                 "--max_output_tokens_per_minute", "1234.5")
    assert args.max_requests_per_minute == "auto"
    assert args.max_tokens_per_minute == "auto"
    assert args.max_output_tokens_per_minute == 1234.5


def test_main_help_returns_zero_and_lists_every_flag(capsys):
    assert app.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    parser_flags = [option for action in app.build_parser()._actions for option in action.option_strings
                    if option.startswith("--")]
    for flag in ORIGINAL_FLAGS + parser_flags:
        assert flag in help_text, flag


def test_help_mentions_every_flag_the_docstring_advertises(capsys):
    app.main(["--help"])
    help_text = capsys.readouterr().out
    inputs = app.__doc__.split("Inputs", 1)[1].split("Output", 1)[0]
    for flag in sorted(set(re.findall(r"--[a-z_]+", inputs))):
        assert re.search(re.escape(flag) + r"\b", help_text), flag


def test_main_without_the_requests_file_is_a_usage_error(capsys):
    assert app.main([]) == 2
    assert "--requests_filepath" in capsys.readouterr().err


def test_main_with_a_bad_flag_value_is_a_usage_error(capsys):
    assert app.main(["--requests_filepath", "x.jsonl", "--max_attempts", "0"]) == 2
    assert "--max_attempts" in capsys.readouterr().err


def test_redactor_removes_the_api_key():
    redact = app.make_redactor("sk-ant-api03-SECRET")
    assert redact("headers: x-api-key=sk-ant-api03-SECRET; again sk-ant-api03-SECRET") == \
        "headers: x-api-key=[redacted]; again [redacted]"
    assert redact("nothing to hide") == "nothing to hide"


def test_redactor_without_a_key_changes_nothing():
    assert app.make_redactor(None)("text") == "text"
    assert app.make_redactor("")("text") == "text"


def test_sampling_counter_counts_short_texts_exactly_and_long_ones_from_samples():
    calls = []

    def encode(text):
        calls.append(len(text))
        return text.split()

    count = app.sampling_counter(encode, exact_up_to_chars=100, sample_chars=20)
    assert count("one two three") == 3
    long_text = "word " * 1000  # 5,000 characters, 1,000 words
    assert count(long_text) == pytest.approx(1000, rel=0.1)
    assert calls[-3:] == [20, 20, 20]  # three samples, not the whole text
    calls.clear()
    assert count(long_text) == pytest.approx(1000, rel=0.1)  # a repeated long text is remembered
    assert calls == []


def test_ramp_up_hands_out_a_full_bucket_over_its_seconds_and_headers_can_cut_it_short():
    bucket = app.TokenBucket(600, 10, now=0)
    bucket.ramp_up(2.0, 0)  # 600 over 2 s, on top of the usual 10 a second
    assert bucket.level(0) == 0
    assert bucket.seconds_until(305, 0) == pytest.approx(305 / 310)
    assert bucket.seconds_until(600, 0) == pytest.approx(600 / 310)  # all of it within the 2 s
    assert bucket.level(1) == pytest.approx(310)
    assert bucket.available(1) == 600  # 310 plus 300 still to come, but a bucket holds at most 600
    bucket.lower_to(100, 1)  # the service says only 100 remain: the rest of the ramp hands out those
    assert bucket.available(1) == 100
    assert bucket.level(1) == 0
    assert bucket.level(2) == pytest.approx(110)


def test_success_line_reuses_the_bytes_sent_and_received():
    job = app.Job(1, {"model": "m", "max_tokens": 5, "messages": []}, metadata={"row": 1})
    raw = json.dumps(message()).encode()
    line = job.success_line(app.Success(message(), raw))
    assert json.loads(line) == [job.body, message(), {"row": 1}]
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    pretty = json.dumps(message(), indent=2).encode()  # an answer over several lines is re-encoded
    assert json.loads(job.success_line(app.Success(message(), pretty))) == [job.body, message(), {"row": 1}]


def test_a_service_that_has_much_less_than_we_thought_teaches_us_others_use_of_the_limit():
    limiter = app.Limiter(limits(600, 10**9, 10**9), now=0)  # 10 requests a second
    for second in range(1, 6):  # someone else takes 5 a second: the service has 5 fewer each second
        limiter.observe_headers({"anthropic-ratelimit-requests-remaining": "0"}, second)
    assert limiter.foreign_per_second["requests"] > 3
    assert limiter.buckets["requests"].refill_per_second < 10 - 3


def test_a_drained_bucket_at_start_is_followed_but_teaches_no_rate_of_others():
    # A resumed run finds the limit spent by its own killed predecessor: believe it, but do not conclude
    # that someone else is using the limit at a furious rate.
    limiter = app.Limiter(limits(1200, 10**9, 10**9), now=0)
    limiter.observe_headers({"anthropic-ratelimit-requests-limit": "1200",
                             "anthropic-ratelimit-requests-remaining": "0"}, 0.05)
    assert limiter.buckets["requests"].level(0.05) == 0
    assert limiter.foreign_per_second["requests"] == 0
    assert limiter.buckets["requests"].refill_per_second == pytest.approx(20)


def test_a_429_pause_lets_the_buckets_gain_nothing_and_several_429s_do_not_add_up():
    limiter = app.Limiter(limits(600, 10**6, 10**6), now=0)  # 10 requests a second
    limiter.pause(2.0, now=0)
    limiter.pause(2.0, now=0)  # a second 429 of the same moment
    # The pause, then one request's refill: the buckets saved nothing up during the pause.
    assert limiter.seconds_until_admissible(app.Need(1, 1, 1), 0) == pytest.approx(2.1)
    assert limiter.buckets["requests"].level(2.0) == pytest.approx(0)
    assert limiter.seconds_until_admissible(app.Need(1, 1, 1), 2.0) == pytest.approx(0.1)


def test_lowering_during_a_ramp_up_keeps_it_a_ramp():
    bucket = app.TokenBucket(1200, 20, now=0)
    bucket.ramp_up(2, now=0)
    bucket.lower_to(600, 0.5)  # someone else is using it: less to hand out, but still not at once
    assert bucket.available(0.5) == pytest.approx(600)
    assert bucket.level(0.5) <= 0
    assert bucket.level(2) == pytest.approx(600 + 1.5 * 20)


def test_a_limit_shared_with_an_equal_user_is_claimed_half():
    limiter = app.Limiter(limits(1200, 10**9, 10**9), now=0)
    limiter.observe_headers({"anthropic-ratelimit-requests-remaining": "1200"}, 0)  # the first reading
    for _ in range(100):
        limiter.take(app.Need(1, 1, 1), 0.5)
    bucket = limiter.buckets["requests"]
    # In that half second the service lost 100 more than we sent: another client as fast as we are.
    remaining = math.floor(bucket.available(0.5)) - 100
    limiter.observe_headers({"anthropic-ratelimit-requests-remaining": str(remaining)}, 0.5)
    reserve = app.SHARED_RESERVE_SECONDS * 20
    assert bucket.available(0.5) == pytest.approx((remaining - reserve) / 2, rel=0.02)
    assert bucket.level(0.5) <= 0  # handed out over the next seconds


def test_while_others_share_the_limit_some_is_left_at_the_service_and_that_is_no_surplus():
    limiter = app.Limiter(limits(1200, 10**9, 10**9), now=0)
    limiter.foreign_per_second["requests"] = 10.0
    limiter.last_resync["requests"] = 0.0
    limiter.observe_headers({"anthropic-ratelimit-requests-remaining": "20"}, 0.5)  # we thought 1200 + 10
    reserve = limiter.shared_reserve("requests")
    assert reserve == pytest.approx(10)
    assert limiter.buckets["requests"].available(0.5) <= 20 - reserve + 1e-9
    foreign = limiter.foreign_per_second["requests"]
    # Two seconds later the service holds what we left it: no reason to think the others use less.
    level = limiter.buckets["requests"].available(2.5)
    limiter.observe_headers({"anthropic-ratelimit-requests-remaining": str(int(level + reserve))}, 2.5)
    assert limiter.foreign_per_second["requests"] == pytest.approx(foreign)


def simulate_clients_sharing_a_limit(starts: list[float], seconds: float, latency: float = 0.3,
                                     per_minute: float = 1200, offered_per_second: float = math.inf,
                                     clients: list | None = None) -> tuple[int, int]:
    """Clients each told they have all of one service bucket: (admitted, 429s). Each sends what its
    limiter admits every 10 ms (up to `offered_per_second`), the service answers after `latency` (a 429
    at once) with its headers, the first request goes alone and the ramp-up starts with its answer, and
    answers are settled in the Scheduler's order. Pass a list as `clients` to see the Limiters after."""
    service = app.TokenBucket(per_minute, per_minute / 60, now=0)
    clients = clients if clients is not None else []
    clients[:] = [app.Limiter(limits(per_minute, 10**9, 10**9), now=start) for start in starts]
    offered = [0.0] * len(starts)
    answers: list[tuple[float, int, bool]] = []  # (when it arrives, client, rate limited)
    contacted, first_sent = set(), set()
    admitted = rejected = 0
    need = app.Need(1, 1, 1)
    order = random.Random(7)
    for step in range(int(seconds * 100)):
        now = step / 100
        for answer in sorted(a for a in answers if a[0] <= now):
            answers.remove(answer)
            _, client, rate_limited = answer
            limiter = clients[client]
            # As the service's headers say when it answers.
            headers = {"anthropic-ratelimit-requests-remaining": str(math.floor(service.level(now)))}
            if rate_limited:
                limiter.settle("requests", 1, 0, now)
                limiter.pause(now + 1, now)
                limiter.learn_from_rate_limit(headers, need, now)
            if client not in contacted:
                contacted.add(client)
                limiter.ramp_up(now)
            limiter.observe_headers(headers, now)
        # Whoever comes first in a moment varies.
        for index, limiter in order.sample(list(enumerate(clients)), len(clients)):
            if now < starts[index] or (index in first_sent and index not in contacted):
                continue
            offered[index] = min(offered[index] + offered_per_second / 100, 10**6)
            while offered[index] >= 1 and limiter.seconds_until_admissible(need, now) == 0:
                offered[index] -= 1
                limiter.take(need, now)
                first_sent.add(index)
                if service.level(now) >= 1:
                    service.take(1, now)
                    admitted += 1
                    answers.append((now + latency, index, False))
                else:
                    rejected += 1
                    answers.append((now + 0.01, index, True))
                if index not in contacted:
                    break
    return admitted, rejected


@pytest.mark.parametrize("starts,latency", [([0, 0], 0.3), ([0, 5], 0.3), ([0, 0, 0], 0.3), ([0, 0], 1.0)])
def test_clients_sharing_a_limit_use_it_all_and_rarely_meet_a_429(starts, latency):
    admitted, rejected = simulate_clients_sharing_a_limit(starts, seconds=60, latency=latency)
    possible = 1200 + 20 * 60
    assert admitted >= 0.9 * possible
    assert rejected <= 0.02 * admitted


def test_a_429_short_of_the_need_teaches_that_others_use_the_limit():
    limiter = app.Limiter(limits(1200, 600_000, 60_000), now=0)
    limiter.observe_headers({"anthropic-ratelimit-requests-remaining": "1200"}, 0)
    assert limiter.shared_reserve("requests") == 0
    # The service had nothing left where our books counted on one request: near an empty bucket,
    # `remaining` cannot show a deficit, the 429 is the sign.
    limiter.learn_from_rate_limit({"anthropic-ratelimit-requests-remaining": "0",
                                   "anthropic-ratelimit-input-tokens-remaining": "500000"}, app.Need(1, 2000, 100), 1)
    assert limiter.foreign_per_second["requests"] > 0
    assert limiter.buckets["requests"].refill_per_second < 20
    assert limiter.shared_reserve("requests") == pytest.approx(app.SHARED_RESERVE_SECONDS * 20)
    assert limiter.foreign_per_second["input-tokens"] == 0  # that bucket held enough


def test_a_shared_token_reserve_is_above_the_rounding_of_the_headers():
    limiter = app.Limiter(limits(1200, 600_000, 30_000), now=0)
    limiter.foreign_per_second["output-tokens"] = 100.0
    assert limiter.shared_reserve("output-tokens") >= 1000 + app.SHARED_RESERVE_SECONDS * 500


@pytest.mark.parametrize("per_second", [2, 10, 19])
def test_a_client_alone_never_takes_itself_for_several(per_second):
    clients: list = []
    admitted, rejected = simulate_clients_sharing_a_limit([0], seconds=120, offered_per_second=per_second,
                                                          clients=clients)
    assert rejected == 0
    assert admitted >= per_second * 118
    assert clients[0].foreign_per_second["requests"] < 0.05 * 20  # at most a trace, soon forgotten
    assert clients[0].buckets["requests"].available(120) > 0.9 * 1200  # nothing given away to no one


def test_a_ramp_up_never_makes_a_bucket_hold_more_than_its_capacity():
    bucket = app.TokenBucket(1200, 20, now=0)
    bucket.ramp_up(2, now=0)
    assert max(bucket.available(t / 10) for t in range(40)) == 1200


def test_several_429s_of_one_moment_teach_as_much_as_one():
    def after(count: int) -> float:
        limiter = app.Limiter(limits(1200, 10**9, 10**9), now=0)
        limiter.observe_headers({"anthropic-ratelimit-requests-remaining": "1200"}, 0)
        for _ in range(count):
            limiter.learn_from_rate_limit({"anthropic-ratelimit-requests-remaining": "0"}, app.Need(1, 1, 1), 5)
        return limiter.foreign_per_second["requests"]
    assert after(5) == after(1) > 0


def test_a_share_is_never_less_than_a_tenth_even_when_our_own_use_was_refunded():
    limiter = app.Limiter(limits(1200, 600_000, 60_000), now=0)
    limiter.observe_headers({"anthropic-ratelimit-output-tokens-remaining": "60000"}, 0)
    limiter.take(app.Need(1, 100, 20_000), 0.5)
    limiter.settle("output-tokens", 20_000, 0, 1)  # the answers used nothing: our own use is now zero
    limiter.observe_headers({"anthropic-ratelimit-output-tokens-remaining": "30000"}, 1)
    bucket = limiter.buckets["output-tokens"]
    reserve = limiter.shared_reserve("output-tokens")
    assert bucket.available(1) == pytest.approx(app.MIN_SHARE * (30_000 - reserve))
    assert bucket.level(1) <= 0  # still handed out over a ramp

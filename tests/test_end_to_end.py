"""What a user does and sees: the real command line, run as a subprocess, against the fake server."""

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import ROOT, SCRIPT, TEST_API_KEY, read_results, run_cli, simple_request, write_requests
from fake_server import ModelLimits, ServerConfig, ServerThread

ORIGINAL_README_COMMANDS = [
    # The two commands of the original cookbook README, verbatim but for --request_url.
    ["--requests_filepath", "examples/test_requests_to_parallel_process.jsonl",
     "--save_filepath", "examples/data/test_requests_to_parallel_process_results.jsonl",
     "--request_url", "{url}", "--max_requests_per_minute", "40", "--max_tokens_per_minute", "16000",
     "--max_attempts", "5", "--logging_level", "INFO"],
    ["--requests_filepath", "examples/test_caching_requests_to_parallel_process.jsonl",
     "--save_filepath", "examples/data/test_caching_requests_to_parallel_process_results.jsonl",
     "--request_url", "{url}", "--use_caching", "True", "--max_requests_per_minute", "40",
     "--max_tokens_per_minute", "16000", "--max_attempts", "5", "--logging_level", "INFO"],
]


@pytest.fixture
def server():
    with ServerThread(ServerConfig(latency_seconds=(0.01, 0.05))) as srv:
        yield srv


def row_ids(results):
    return Counter(line[2]["row_id"] for line in results)


@pytest.mark.parametrize("command", ORIGINAL_README_COMMANDS, ids=["without_caching", "with_caching"])
def test_original_readme_commands_complete_with_metadata(tmp_path, server, command):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    args = [part.format(url=server.messages_url) for part in command]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    inputs = [line for line in (tmp_path / args[1]).read_text().splitlines() if line.strip()]
    results = read_results(tmp_path / args[3])
    assert len(results) == len(inputs)
    assert all(len(line) == 3 and line[1]["type"] == "message" for line in results)
    assert all("metadata" not in line[0] for line in results)  # the tool's metadata is never sent
    if "--use_caching" in args:
        assert "Caching is enabled and working" in done.stderr
        assert server.stats_snapshot()["cache_writes"] == 1


def test_every_line_answered_exactly_once_despite_faults(tmp_path):
    # One request in five meets a fault, 1 to 3 times in a row: overload, server error, HTML pages,
    # dropped connections, hangs (cut by a short timeout), truncated JSON, a 200 without content.
    kinds = ["529", "500", "503_html", "502_html", "drop", "hang", "bad_json", "no_content"]
    rows = []
    for i in range(200):
        marker = f"[[fault:{kinds[i // 5 % len(kinds)]}*{1 + i % 3}]]" if i % 5 == 0 else ""
        rows.append(simple_request(i, marker))
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    with ServerThread(ServerConfig(latency_seconds=(0.0, 0.02))) as srv:
        done = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url,
                        "--max_requests_per_minute", "100000", "--max_tokens_per_minute", "10000000",
                        "--max_output_tokens_per_minute", "10000000", "--request_timeout", "1",
                        "--logging_level", "DEBUG"], env_extra={"APPP_BACKOFF_SCALE": "0.01"})
        stats = srv.stats_snapshot()
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "requests_results.jsonl")
    assert row_ids(results) == Counter(range(200))
    assert all(line[1]["type"] == "message" for line in results)
    # No answer was paid for twice.
    assert stats["successes"] == 200
    assert max(stats["request_bodies_by_fingerprint"].values()) == 1


def test_retries_never_end_the_run_early(tmp_path):
    # The original counted every attempt as a finished task, so a run of retries could stop it early.
    rows = [simple_request(i, "[[fault:529*2]]") for i in range(8)]
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    with ServerThread(ServerConfig()) as srv:
        done = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url],
                       env_extra={"APPP_BACKOFF_SCALE": "0.01"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert row_ids(read_results(tmp_path / "requests_results.jsonl")) == Counter(range(8))


def test_no_429_when_our_limits_equal_the_servers(tmp_path):
    # Each bucket binds in turn: requests first, then input tokens, then output tokens.
    limits = ModelLimits(requests_per_minute=600, input_tokens_per_minute=12_000, output_tokens_per_minute=3_000)
    rows = [simple_request(i, "word " * (i % 40)) for i in range(80)]
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    config = ServerConfig(limits={"default": limits}, latency_seconds=(0.05, 0.3), output_tokens=(10, 40))
    with ServerThread(config) as srv:
        done = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url,
                        "--max_requests_per_minute", "600", "--max_tokens_per_minute", "12000",
                        "--max_output_tokens_per_minute", "3000"])
        stats = srv.stats_snapshot()
    assert done.returncode == 0, done.stderr[-3000:]
    assert stats["rate_limited"] == 0
    assert row_ids(read_results(tmp_path / "requests_results.jsonl")) == Counter(range(80))


def test_a_429_pauses_the_model_and_the_request_is_retried(tmp_path):
    # Our limits are far above the server's, and it sends no rate-limit headers to warn us: it answers
    # 429 with retry-after, and we obey it.
    limits = ModelLimits(requests_per_minute=120)
    requests = write_requests(tmp_path / "requests.jsonl", [simple_request(i) for i in range(125)])
    with ServerThread(ServerConfig(limits={"default": limits}, send_ratelimit_headers=False)) as srv:
        done = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url,
                        "--max_requests_per_minute", "10000", "--max_attempts", "10"])
        stats = srv.stats_snapshot()
    assert done.returncode == 0, done.stderr[-3000:]
    assert stats["rate_limited"] >= 1
    assert "rate limited (429); pausing" in done.stderr
    assert row_ids(read_results(tmp_path / "requests_results.jsonl")) == Counter(range(125))


def test_a_400_fails_only_that_request_at_once(tmp_path, server):
    rows = [simple_request(i, "[[fault:400]]" if i in (3, 7) else "") for i in range(10)]
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    done = run_cli(["--requests_filepath", requests, "--request_url", server.messages_url])
    assert done.returncode == 1
    results = read_results(tmp_path / "requests_results.jsonl")
    failures = {line[2]["row_id"]: line[1] for line in results if isinstance(line[1], list)}
    assert set(failures) == {3, 7}
    assert all(len(errors) == 1 and errors[0].startswith("400 invalid_request_error") for errors in failures.values())
    assert row_ids(results) == Counter(range(10))


def test_a_rejected_key_stops_the_run_with_status_3(tmp_path):
    requests = write_requests(tmp_path / "requests.jsonl", [simple_request(i) for i in range(50)])
    with ServerThread(ServerConfig(api_key="the-right-key", latency_seconds=(0.2, 0.2))) as srv:
        started = time.monotonic()
        done = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url])
        elapsed = time.monotonic() - started
    assert done.returncode == 3
    assert "API key rejected (401 authentication_error): check ANTHROPIC_API_KEY" in done.stderr
    assert elapsed < 10  # the acceptance figure (under 2 s) is measured by benchmarks, not asserted here
    # Nothing was answered, so nothing is written: a later run with the right key does them all.
    assert read_results(tmp_path / "requests_results.jsonl") == []


def test_the_spend_limit_stops_the_run(tmp_path, server):
    requests = write_requests(tmp_path / "requests.jsonl", [simple_request(0, "[[spend_limit]]")])
    done = run_cli(["--requests_filepath", requests, "--request_url", server.messages_url])
    assert done.returncode == 3
    assert "spend limit reached" in done.stderr


def test_usage_errors_exit_2_before_any_request(tmp_path, server):
    missing = run_cli(["--requests_filepath", tmp_path / "nope.jsonl", "--request_url", server.messages_url])
    assert missing.returncode == 2 and "requests file not found" in missing.stderr
    bad_flag = run_cli(["--requests_filepath", tmp_path / "nope.jsonl", "--max_attempts", "zero"])
    assert bad_flag.returncode == 2
    requests = write_requests(tmp_path / "requests.jsonl", [simple_request(0)])
    same = run_cli(["--requests_filepath", requests, "--save_filepath", requests, "--request_url", server.messages_url])
    assert same.returncode == 2 and "the save file is the requests file" in same.stderr
    no_key = run_cli(["--requests_filepath", requests, "--request_url", server.messages_url], api_key=None,
                     cwd=tmp_path)
    assert no_key.returncode == 2 and "no API key" in no_key.stderr
    assert server.stats_snapshot()["requests_received"] == 0


def test_use_caching_false_means_false(tmp_path, server):
    requests = write_requests(tmp_path / "requests.jsonl", [simple_request(i) for i in range(3)])
    done = run_cli(["--requests_filepath", requests, "--request_url", server.messages_url, "--use_caching", "False"])
    assert done.returncode == 0
    assert "Caching" not in done.stderr


def test_the_api_key_never_appears_anywhere_even_at_trace(tmp_path):
    kinds = ["529", "500", "503_html", "drop", "bad_json", "400", "413", "404", "hang"]
    rows = [simple_request(i, f"[[fault:{kinds[i % len(kinds)]}*1]]") for i in range(27)]
    requests = write_requests(tmp_path / "requests.jsonl", rows + ["{not json", '{"model": 5}'])
    summary = tmp_path / "summary.json"
    with ServerThread(ServerConfig()) as srv:
        done = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url, "--logging_level",
                        "TRACE", "--request_timeout", "1", "--summary_filepath", summary],
                       env_extra={"APPP_BACKOFF_SCALE": "0.01"})
        passed_as_flag = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url,
                                  "--api_key", TEST_API_KEY, "--logging_level", "TRACE", "--overwrite",
                                  "--request_timeout", "1"], api_key=None, env_extra={"APPP_BACKOFF_SCALE": "0.01"})
    assert "where other users of this machine can see it" in passed_as_flag.stderr
    for text in (done.stdout, done.stderr, passed_as_flag.stdout, passed_as_flag.stderr,
                 (tmp_path / "requests_results.jsonl").read_text(), summary.read_text()):
        assert TEST_API_KEY not in text
        assert TEST_API_KEY[-12:] not in text


def test_resume_sends_only_what_is_not_answered(tmp_path):
    rows = [simple_request(i, "[[fault:529*1]]" if i % 4 == 0 else "") for i in range(20)]
    rows.append(simple_request(0))  # an identical request twice counts twice
    rows.append(simple_request(0))
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    with ServerThread(ServerConfig()) as srv:
        first = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url, "--max_attempts", "1"])
        received_first = srv.stats_snapshot()["requests_received"]
        second = run_cli(["--requests_filepath", requests, "--request_url", srv.messages_url])
        received_second = srv.stats_snapshot()["requests_received"] - received_first
    assert first.returncode == 1 and second.returncode == 0, second.stderr[-2000:]
    assert "already answered" in second.stderr
    assert received_second == 5  # only the five that failed the first time
    results = read_results(tmp_path / "requests_results.jsonl")
    assert len(results) == 22 and all(line[1]["type"] == "message" for line in results)
    assert row_ids(results) == Counter(list(range(20)) + [0, 0])


def test_streamed_and_plain_answers_are_identical(tmp_path, server):
    rows = [simple_request(i, max_tokens=60 + i) for i in range(30)]
    rows.append({"model": "claude-sonnet-4-5", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 1024},
                 "messages": [{"role": "user", "content": "think"}], "metadata": {"row_id": 30}})
    rows.append({"model": "claude-sonnet-4-5", "max_tokens": 200, "metadata": {"row_id": 31},
                 "tools": [{"name": "get_weather", "description": "weather",
                            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                 "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "weather in Paris?"}]})
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    outputs = {}
    for mode in ("always", "never"):
        save = tmp_path / f"{mode}.jsonl"
        done = run_cli(["--requests_filepath", requests, "--save_filepath", save, "--request_url",
                        server.messages_url, "--stream", mode, "--max_output_tokens_per_minute", "100000"])
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[mode] = {line[2]["row_id"]: line for line in read_results(save)}

    def without_ids(line):
        request, message, metadata = line
        message = dict(message, id=None)
        message["content"] = [{k: v for k, v in block.items() if k != "id"} for block in message["content"]]
        return request, message, metadata

    assert outputs["always"].keys() == outputs["never"].keys() == set(range(32))
    for row in outputs["always"]:
        assert without_ids(outputs["always"][row]) == without_ids(outputs["never"][row])


def test_mid_stream_errors_are_retried_and_never_written_as_success(tmp_path, server):
    rows = [simple_request(i, "[[fault:stream_error*1]]" if i % 2 else "[[fault:stream_drop*2]]") for i in range(6)]
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    done = run_cli(["--requests_filepath", requests, "--request_url", server.messages_url, "--stream", "always",
                    "--logging_level", "DEBUG"], env_extra={"APPP_BACKOFF_SCALE": "0.01"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = read_results(tmp_path / "requests_results.jsonl")
    assert row_ids(results) == Counter(range(6))
    assert all(line[1]["stop_reason"] for line in results)
    assert "in stream: 529 overloaded_error" in done.stderr


def test_ctrl_c_stops_gracefully_and_the_same_command_resumes(tmp_path):
    # 120 requests at once, then two a second: a run of about a minute, stopped after a few seconds.
    requests = write_requests(tmp_path / "requests.jsonl", [simple_request(i) for i in range(200)])
    with ServerThread(ServerConfig(latency_seconds=(0.5, 1.0))) as srv:
        args = ["--requests_filepath", requests, "--request_url", srv.messages_url, "--max_requests_per_minute", "120",
                "--max_output_tokens_per_minute", "100000", "--max_tokens_per_minute", "1000000"]
        process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stderr=subprocess.PIPE, text=True,
                                   env={"ANTHROPIC_API_KEY": TEST_API_KEY, "PATH": "/usr/bin:/bin"})
        time.sleep(3)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr[-2000:]
        assert "To resume, run the same command again" in stderr
        partial = read_results(tmp_path / "requests_results.jsonl")
        assert 120 <= len(partial) < 200  # the first full bucket was in flight and finished within the grace
        assert len(partial) == len(row_ids(partial))
        resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert row_ids(read_results(tmp_path / "requests_results.jsonl")) == Counter(range(200))


def test_bad_lines_are_reported_with_their_number_and_the_rest_goes_on(tmp_path, server):
    bad_lines = [
        "{not json", "[1, 2]", '"a string"', "42", "null",
        '{"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}',  # no model
        '{"model": 7, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}',
        '{"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}',  # no max_tokens
        '{"model": "claude-sonnet-4-5", "max_tokens": "10", "messages": [{"role": "user", "content": "hi"}]}',
        '{"model": "claude-sonnet-4-5", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}',
        '{"model": "claude-sonnet-4-5", "max_tokens": 10}',  # no messages
        '{"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": []}',
        '{"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "robot", "content": "hi"}]}',
        '{"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": 5}]}',
        '{"model": "claude-sonnet-4-5", "max_tokens": 10, "system": 5, "messages": [{"role": "user", "content": "hi"}]}',
        '{"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}',
    ]
    rows, expected_bad = [], []
    for i in range(40):
        rows.append(simple_request(i))
        if i < len(bad_lines):
            rows.append(bad_lines[i])
            expected_bad.append(len(rows))
    path = tmp_path / "requests.jsonl"
    write_requests(path, rows)
    with open(path, "ab") as file:  # invalid UTF-8
        file.write(b'{"model": "claude-sonnet-4-5", "text": "\xff\xfe"}\n')
    expected_bad.append(len(rows) + 1)
    done = run_cli(["--requests_filepath", path, "--request_url", server.messages_url])
    assert done.returncode == 1
    results = read_results(tmp_path / "requests_results.jsonl")
    reported = sorted(int(line[1][0].split(":")[0].split()[1]) for line in results if isinstance(line[1], list))
    assert reported == expected_bad
    assert len(expected_bad) >= 17
    for number in expected_bad:
        assert f"line {number}:" in done.stderr
    assert Counter(line[2]["row_id"] for line in results if isinstance(line[1], dict)) == Counter(range(40))


def test_dry_run_needs_no_key_and_no_network(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    done = run_cli(["--requests_filepath", "examples/test_caching_requests_to_parallel_process.jsonl",
                    "--use_caching", "True", "--dry_run", "--request_url", "http://127.0.0.1:9/v1/messages"],
                   api_key=None, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "10 valid request(s)" in done.stdout
    assert "cost" in done.stdout and "duration" in done.stdout
    assert not (tmp_path / "examples" / "test_caching_requests_to_parallel_process_results.jsonl").exists()


def test_batch_mode_writes_the_same_lines_and_reruns_retry_only_the_failures(tmp_path):
    rows = [simple_request(i) for i in range(300)]
    requests = write_requests(tmp_path / "requests.jsonl", rows)
    config = ServerConfig(batch_processing_seconds=0.3, batch_error_rate=0.05, batch_expire_rate=0.05)
    with ServerThread(config) as srv:
        args = ["--requests_filepath", requests, "--request_url", srv.messages_url, "--batch",
                "--batch_poll_interval", "0.2"]
        first = run_cli(args)
        results = read_results(tmp_path / "requests_results.jsonl")
        failed = {line[2]["row_id"] for line in results if isinstance(line[1], list)}
        assert first.returncode == 1 and failed
        assert any("expired" in line[1][0] for line in results if isinstance(line[1], list))
        assert any("errored" in line[1][0] for line in results if isinstance(line[1], list))
        srv.set_config(batch_error_rate=0.0, batch_expire_rate=0.0)
        second = run_cli(args)
        assert srv.stats_snapshot()["batches_created"] == 2
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{len(failed)} request(s)" in second.stderr
    results = read_results(tmp_path / "requests_results.jsonl")
    assert row_ids(results) == Counter(range(300))
    assert all(line[1]["type"] == "message" for line in results)
    assert not (tmp_path / "requests_results.jsonl.batch_state.json").exists()


def test_a_streamed_answer_may_take_longer_than_the_request_timeout_while_events_keep_coming(tmp_path):
    # Each answer takes 3 s, its events spread over that time; --request_timeout is 1.5 s.
    requests = write_requests(tmp_path / "requests.jsonl", [simple_request(i, max_tokens=400) for i in range(3)])
    config = ServerConfig(latency_seconds=(3.0, 3.0), output_tokens=(200, 200))
    with ServerThread(config) as srv:
        streamed = run_cli(["--requests_filepath", requests, "--save_filepath", tmp_path / "streamed.jsonl",
                            "--request_url", srv.messages_url, "--stream", "always", "--request_timeout", "1.5",
                            "--max_output_tokens_per_minute", "100000"])
        plain = run_cli(["--requests_filepath", requests, "--save_filepath", tmp_path / "plain.jsonl",
                         "--request_url", srv.messages_url, "--stream", "never", "--request_timeout", "1.5",
                         "--max_output_tokens_per_minute", "100000", "--max_attempts", "2"],
                        env_extra={"APPP_BACKOFF_SCALE": "0.01"})
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert all(line[1]["type"] == "message" for line in read_results(tmp_path / "streamed.jsonl"))
    assert plain.returncode == 1
    assert all(line[1] == ["timeout: no answer within 1.5 s"] * 2 for line in read_results(tmp_path / "plain.jsonl"))

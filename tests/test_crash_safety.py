"""kill -9 in the middle of a job, three times, then the same command to the end (about 15 s).

The fast version of part 1 of benchmarks/crash_safety.py, which holds the machinery: 300 distinct
requests, 20% random faults (hangs cut by --request_timeout 2), answers in 0.3-1.5 s, at most 40 in flight
(so that the job lasts about 10 s), the processor SIGKILLed 1-2.5 s after each start and started again.
Answers stay shorter than the timeout: a request the server answers just as the client gives up is paid
twice without any kill, which would blur the bound checked here.
"""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import crash_safety  # noqa: E402


def test_kill_9_three_times_then_resume_leaves_one_line_per_request(tmp_path):
    result = crash_safety.run_kill9(
        tmp_path / "work", n=300, kills=3, rpm=100_000, seed=11, kill_after=(1.0, 2.5), latency=(0.3, 1.5),
        backoff_scale=0.2, final_timeout=40, log=tmp_path / "processor.log",
        extra_args=("--max_concurrent_requests", "40"))
    summary = {k: v for k, v in result.items() if k != "per_kill"}
    assert result["problems"] == [], (summary, (tmp_path / "processor.log").read_text()[-3000:])
    assert result["kills"] == 3
    assert result["final_exit"] == 0
    # One complete success line per input, each row once, and nothing garbled.
    assert result["final_lines"] == result["final_successes"] == result["final_distinct_rows"] == 300
    assert result["final_torn_bytes"] == 0 and result["final_garbage"] == 0
    # A result in the file is never asked for again; what was paid twice was in flight at a kill.
    assert result["resent_after_written"] == 0
    assert result["duplicate_paid_answers"] <= result["bound_answered_unwritten_at_kills"]
    assert result["unexplained_duplicates"] == 0

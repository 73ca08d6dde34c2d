"""Two small figures: the CPU share of a run that mostly waits on its rate limit, and how fast a rejected
key stops the run (exit status 3).

    python benchmarks/idle_and_abort.py
"""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
os.chdir(tempfile.mkdtemp(prefix='appp-idle-'))
sys.path[:0] = [str(ROOT / 'tests')]
from fake_server import ModelLimits, ServerConfig, ServerThread
open('req.jsonl','w').write(''.join(json.dumps({"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":f"q {i}"}]})+'\n' for i in range(100)))
with ServerThread(ServerConfig(limits={"default": ModelLimits(60, 10**7, 10**7)}, latency_seconds=(0.5, 1.0))) as srv:
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, str(ROOT / 'api_request_parallel_processor.py'), '--requests_filepath', 'req.jsonl', '--overwrite', '--request_url', srv.messages_url, '--max_requests_per_minute', '60', '--max_tokens_per_minute', '10000000', '--max_output_tokens_per_minute', '10000000'], stderr=subprocess.DEVNULL, env={'ANTHROPIC_API_KEY': 'sk-ant-idle-benchmark', 'PATH': '/usr/bin:/bin'})
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
    print(f"100 requests at 60/min: wall {wall:.1f} s, CPU {usage.ru_utime + usage.ru_stime:.2f} s = {(usage.ru_utime + usage.ru_stime) / wall:.2%} of wall (start-up included), 429s {srv.stats_snapshot()['rate_limited']}")
    # a rejected key: time to exit 3
    srv.set_config(api_key="the-right-key")
    t = time.monotonic()
    d = subprocess.run([sys.executable, str(ROOT / 'api_request_parallel_processor.py'), '--requests_filepath', 'req.jsonl', '--save_filepath', 'k.jsonl', '--request_url', srv.messages_url], capture_output=True, text=True, env={'ANTHROPIC_API_KEY': 'sk-ant-wrong-key-123', 'PATH': '/usr/bin:/bin'})
    print(f"rejected key: exit {d.returncode} after {time.monotonic() - t:.2f} s (process start to exit); message: {[l for l in d.stderr.splitlines() if 'API key rejected' in l][0].split('| ')[-1]}")

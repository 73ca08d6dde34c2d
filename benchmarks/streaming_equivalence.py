"""Streamed and plain answers give the same result lines: 200 requests (text, thinking, forced tool use)
run with --stream always and with --stream never against the fake server, compared apart from ids.

    python benchmarks/streaming_equivalence.py
"""
import json, os, random, subprocess, sys, tempfile
from pathlib import Path
os.chdir(tempfile.mkdtemp(prefix='appp-stream-'))
sys.path[:0] = [str(Path(__file__).resolve().parent.parent / 'tests')]
from fake_server import ServerConfig, ServerThread
rng = random.Random(5)
rows = []
for i in range(200):
    kind = i % 4
    body = {"model": "claude-sonnet-4-5", "max_tokens": 2000, "messages": [{"role": "user", "content": f"Question {i}: " + "word " * rng.randint(1, 200)}], "metadata": {"row": i}}
    if kind == 1:
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    if kind == 2:
        body["tools"] = [{"name": "lookup", "description": "look something up", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
        body["tool_choice"] = {"type": "any"}
    rows.append(body)
open('req.jsonl', 'w').write(''.join(json.dumps(r) + '\n' for r in rows))
out = {}
with ServerThread(ServerConfig(latency_seconds=(0.05, 0.3), output_tokens=(20, 400))) as srv:
    for mode in ('always', 'never'):
        d = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / 'api_request_parallel_processor.py'), '--requests_filepath', 'req.jsonl', '--save_filepath', f'{mode}.jsonl', '--overwrite', '--request_url', srv.messages_url, '--stream', mode, '--max_requests_per_minute', '10000', '--max_tokens_per_minute', '10000000', '--max_output_tokens_per_minute', '10000000'], capture_output=True, text=True, env={'ANTHROPIC_API_KEY': 'sk-ant-benchmark-key', 'PATH': '/usr/bin:/bin'})
        assert d.returncode == 0, d.stderr[-1000:]
        out[mode] = {json.loads(l)[2]['row']: json.loads(l) for l in open(f'{mode}.jsonl')}
def strip(line):
    req, msg, meta = line
    msg = dict(msg, id=None)
    msg['content'] = [{k: v for k, v in b.items() if k != 'id'} for b in msg['content']]
    return req, msg, meta
same = sum(strip(out['always'][r]) == strip(out['never'][r]) for r in range(200))
kinds = {}
for r in range(200):
    for b in out['never'][r][1]['content']:
        kinds[b['type']] = kinds.get(b['type'], 0) + 1
print(f"{same}/200 result lines identical apart from ids between --stream always and --stream never; block types: {kinds}")

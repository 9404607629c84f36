#!/usr/bin/env python3
"""What one flag definition costs the server: starts `vane serve` on a fresh data directory,
writes one flag full of regular expressions, evaluates it once and toggles it 20 times, and prints
the server's RSS growth after each step (docs/RELIABILITY.md, "What one definition may cost").

    python3 benches/tools/definition-cost.py target/release/vane captures60   # 63 KB, refused now
    python3 benches/tools/definition-cost.py target/release/vane captures8
    python3 benches/tools/definition-cost.py target/release/vane modest60

Loopback only; bounded: one write, one evaluation, 20 toggles.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CAPTURES = "^(user|admin|guest|staff)-([0-9]{1,6})-(eu|us|ap)-(a|b|c|d)" * 16
MODEST = "^(user|admin)-[0-9]{1,6}@(vane|example)[.]dev$"
FLAGS = {"captures60": (CAPTURES, 60), "captures8": (CAPTURES, 8), "modest60": (MODEST, 60)}

vane, kind = sys.argv[1], sys.argv[2]
pattern, rules = FLAGS[kind]
data = tempfile.mkdtemp(prefix="vane-cost-")
server = subprocess.Popen(
    [vane, "--data", data, "serve", "--listen", "127.0.0.1:29443", "--http", "127.0.0.1:29480", "--no-quic"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base = "http://127.0.0.1:29480"
try:
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/readyz")
            break
        except Exception:
            time.sleep(0.05)
    token = open(os.path.join(data, "admin-token")).read().strip()

    def call(method, path, body=None):
        req = urllib.request.Request(
            base + "/api/v1" + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def rss():
        for line in open(f"/proc/{server.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
        return 0

    call("POST", "/environments", {"name": "prod"})
    flag = {"on": True, "variants": {"a": 1, "b": 2}, "off_variant": "a", "fallthrough": {"variant": "a"},
            "rules": [{"clauses": [{"attribute": "email", "op": "matches", "values": [pattern[:1000]]}],
                       "serve": {"variant": "b"}} for _ in range(rules)]}
    mb = lambda b: round(b / 1e6, 1)
    before = rss()
    status, answer = call("PUT", "/environments/prod/flags/cost", flag)
    report = {"flag": kind, "body_bytes": len(json.dumps(flag)), "status": status, "after_write_MB": mb(rss() - before)}
    if status != 200:
        report["refused"] = answer["error"]["message"]
    else:
        call("POST", "/environments/prod/flags/cost/evaluate", {"context": {"key": "u", "email": "user-1@vane.dev"}})
        report["after_evaluation_MB"] = mb(rss() - before)
        for i in range(20):
            call("POST", "/environments/prod/flags/cost/toggle", {"on": i % 2 == 1})
        report["after_20_toggles_MB"] = mb(rss() - before)
    print(json.dumps(report))
finally:
    server.terminate()
    server.wait()
    shutil.rmtree(data, ignore_errors=True)

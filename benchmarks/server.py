"""A chat through HTTP, timed side by side: ``gemma4-serve`` against ``mlx_lm.server``, and against our Python API.

    python -m benchmarks.server --size small --q-bits 0 --first 300 --turns 8 --gen 16

Writes (or reuses) the random-weight checkpoint of benchmarks/e2e.py, converts it with each implementation's own
converter, and starts both servers as processes on free localhost ports. Then one conversation runs through each, in
turns (the order alternating every turn, so drift in the machine's load hits both alike): a first user message of
about --first tokens, then --turns follow-ups of a 30-token message each, every request carrying the whole
conversation so far as OpenAI clients do (earlier answers are a fixed sentence, so both servers see the same
prompts). Each request streams --gen tokens (greedy) through the official openai client. Per follow-up request:
TTFT (from sending the request to the first chunk with generated text) and the whole request's time; requests per
minute = 60 / median request time (one client, one request at a time).

Overhead over the Python API: the same conversation through ``ChatSession.stream`` in this process (same model
files, same greedy tokens), request time against answer time; the median difference is what HTTP, JSON, SSE, the
request line and the client cost per request, but two processes' timings on a busy machine differ by more than that.
So the server also reports its own time (``timings.queued_ms`` + ``timings.model_ms``: waiting in line, and on the
model's thread from taking the request to its last token), and what a client waits beyond it is the overhead, per
chat request and, at the end, for --overhead-requests one-token requests over plain HTTP and through the openai
client. Random weights may end an answer early; generated token counts are printed so unequal work shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.e2e import ROOT, WORDS, convert_all, make_checkpoint

ANSWER = "Sure, here is a short answer about the fox and the dog."


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], ready_path: str, model: str):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd + ["--port", str(self.port)], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{name} server exited:\n{self.log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        import openai

        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)
        self.model = model

    def request(self, messages: list[dict], gen: int) -> dict:
        t0 = time.perf_counter()
        first = None
        pieces = 0
        server: dict = {}
        for chunk in self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=gen,
                                                         temperature=0.0, stream=True):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and (delta.content or getattr(delta, "reasoning_content", None)
                                      or delta.tool_calls) and first is None:
                first = time.perf_counter()
            pieces += bool(delta is not None and (delta.content or delta.tool_calls))
            server = (chunk.model_extra or {}).get("timings") or server
        end = time.perf_counter()
        out = {"ttft_ms": ((first or end) - t0) * 1000, "request_ms": (end - t0) * 1000, "chunks": pieces}
        if "model_ms" in server:  # ours: what the model thread spent; the rest is HTTP, JSON, SSE and the client
            out["outside_model_ms"] = out["request_ms"] - server["queued_ms"] - server["model_ms"]
        return out

    def outside_model(self, messages: list[dict], n: int) -> dict:
        """Medians over ``n`` one-token requests of what a client waits beyond the server's own queued + model
        time (ours only: it reports them), through plain HTTP and through the openai client."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port)
        out = {}
        for via in ("http", "openai"):
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                if via == "http":
                    conn.request("POST", "/v1/chat/completions", json.dumps(
                        {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0}),
                        {"Content-Type": "application/json"})
                    timings = json.loads(conn.getresponse().read())["timings"]
                else:
                    timings = self.client.chat.completions.create(
                        model=self.model, messages=messages, max_tokens=1, temperature=0.0).model_extra["timings"]
                wall = (time.perf_counter() - t0) * 1000
                samples.append(wall - timings["queued_ms"] - timings["model_ms"])
            out[via] = statistics.median(samples)
        conn.close()
        return out

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


class PythonAPI:
    """Our ChatSession in this process: the work the server does, without HTTP."""

    name = "python-api"

    def __init__(self, path: Path):
        from mlx_gemma4 import ChatSession, load

        self.session = ChatSession(*load(path))

    def request(self, messages: list[dict], gen: int) -> dict:
        t0 = time.perf_counter()
        first = None
        n = 0
        for r in self.session.stream(messages, max_tokens=gen, temperature=0.0):
            if r.text and first is None:
                first = time.perf_counter()
            n = r.generation_tokens
        end = time.perf_counter()
        return {"ttft_ms": ((first or end) - t0) * 1000, "request_ms": (end - t0) * 1000, "tokens": n}


def conversation(first_tokens: int, turns: int, seed: int) -> list[list[dict]]:
    """The requests of one chat: a long first message, then 30-token follow-ups (~1.3 tokens a word here)."""
    words = [WORDS[(seed + i) % len(WORDS)] for i in range(int(first_tokens / 1.3))]
    history = [{"role": "user", "content": " ".join(words)}]
    requests = [list(history)]
    for t in range(turns):
        message = " ".join(WORDS[(seed + 7 * t + i) % len(WORDS)] for i in range(23))
        history += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": message}]
        requests.append(list(history))
    return requests


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="a size of tests/random_checkpoint.py")
    ap.add_argument("--work", type=Path, default=Path("bench-work"))
    ap.add_argument("--q-bits", type=int, default=0, help="0: unquantized bfloat16")
    ap.add_argument("--q-group-size", type=int, default=64)
    ap.add_argument("--first", type=int, default=300, help="tokens of the first user message")
    ap.add_argument("--turns", type=int, default=8, help="follow-up requests timed")
    ap.add_argument("--gen", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--compare", default="mlx-lm", help="'mlx-lm' or '' (ours alone)")
    ap.add_argument("--overhead-requests", type=int, default=30,
                    help="one-token requests that time what our server adds outside the model thread")
    ap.add_argument("--json", type=Path, help="append the results here as one JSON object")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped on the way out

    a.work.mkdir(parents=True, exist_ok=True)
    names = ["ours"] + [n for n in a.compare.split(",") if n]
    paths = convert_all(make_checkpoint(a.size, a.work / f"hf-{a.size}"), a.work, names, a.q_bits, a.q_group_size)
    py = sys.executable
    impls: list = []
    try:
        impls.append(Server("ours", [py, "-m", "mlx_gemma4.server", "--model", str(paths["ours"]),
                                     "--log-level", "warning"], "/health", paths["ours"].name))
        if "mlx-lm" in paths:  # it serves the model it was started with when asked for that path
            impls.append(Server("mlx-lm", [py, "-m", "mlx_lm", "server", "--model", str(paths["mlx-lm"]),
                                           "--log-level", "WARNING"], "/health", str(paths["mlx-lm"])))
        impls.append(PythonAPI(paths["ours"]))
        for impl in impls:  # warm-up: one short chat each (kernels are built per shape)
            for messages in conversation(a.first, 2, seed=3):
                impl.request(messages, a.gen)
        runs: dict[str, list[dict]] = {i.name: [] for i in impls}
        for t, messages in enumerate(conversation(a.first, a.turns, seed=0)):
            for impl in impls if t % 2 == 0 else impls[::-1]:
                r = impl.request(messages, a.gen)
                if t > 0:  # the first request is a long prefill, not a follow-up
                    runs[impl.name].append(r)
                    print(f"# turn {t} {impl.name}: " + json.dumps({k: round(v, 1) for k, v in r.items()}),
                          flush=True)
        fixed = impls[0].outside_model(conversation(a.first, 1, seed=0)[-1], a.overhead_requests)
    finally:
        for impl in impls:
            if isinstance(impl, Server):
                impl.close()
    med = {n: {k: statistics.median(x[k] for x in rs) for k in ("ttft_ms", "request_ms")} for n, rs in runs.items()}
    for m in med.values():
        m["requests_per_min"] = 60_000 / m["request_ms"]
    overhead = statistics.median(s["request_ms"] - p["request_ms"] for s, p in zip(runs["ours"], runs["python-api"]))
    outside = statistics.median(r["outside_model_ms"] for r in runs["ours"])
    result = dict(size=a.size, q_bits=a.q_bits, first_tokens=a.first, turns=a.turns, gen=a.gen,
                  machine=platform.machine(), median=med, overhead_ms=overhead, outside_model_ms=outside,
                  one_token_outside_model_ms=fixed, all=runs)
    print(f"\nfollow-up turn (30-token message, {a.gen} tokens generated), medians of {a.turns} requests:")
    print("| | TTFT | request | requests/min |\n|---|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m['ttft_ms']:.1f} ms | {m['request_ms']:.1f} ms | {m['requests_per_min']:.0f} |")
    print(f"ours over the Python API: {overhead:+.1f} ms per request (median of per-turn differences)")
    print(f"ours outside the model thread (client-measured request - server's queued + model time): {outside:.1f} ms "
          f"per chat request; one-token requests: {fixed['http']:.1f} ms over plain HTTP, {fixed['openai']:.1f} ms "
          "through the openai client")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

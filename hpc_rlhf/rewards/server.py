"""A small reference reward server for both request formats of `hpc_rlhf.rewards.remote`.

    python -m hpc_rlhf.rewards.server --task arithmetic --port 0
    python -m hpc_rlhf.rewards.server --func examples/reward_func_example.py --port 8000

A request with "query" is read as OpenRLHF's ({"query", "prompts", "labels"}: the response is
"responses" when the client sent it, as ours does, else the query after its prompt, special
tokens included; the dataset prompt is "messages" when sent, else the prompt), one with
"queries" as ours ({"queries", "responses", "labels"}).
The answer is {"rewards": [...]}, plus "scores" and "extra_logs" when the reward function
returns them. So OpenRLHF's client can use it unchanged.

Binds 127.0.0.1 only (put a real proxy in front to expose it) and prints one line
`hpc_rlhf reward server: port=<port> url=http://127.0.0.1:<port>/` once it accepts requests.
Any POST path scores; GET /health answers {"ok": true}. With HPC_RLHF_REWARD_API_KEY set in the
server's environment, requests must carry `Authorization: Bearer <that key>` (else 401).

Fault injection, for tests of the client's retries and errors (counted over POSTs):
  --fail-first N      the first N requests answer HTTP 500
  --hang-first N      the first N requests sleep --hang-s seconds before answering
  --malformed         every answer is invalid JSON
  --wrong-count       every answer has one reward too few
  --echo-auth         error answers echo the request's Authorization header (a leaky proxy)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from hpc_rlhf.rewards.base import RewardBatch
from hpc_rlhf.rewards.remote import API_KEY_ENV

ScoreFn = Callable[[RewardBatch], dict]  # -> {"rewards": [...], optional "scores", "extra_logs"}


@dataclass(frozen=True)
class Faults:
    fail_first: int = 0
    hang_first: int = 0
    hang_s: float = 30.0
    malformed: bool = False
    wrong_count: bool = False
    echo_auth: bool = False


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler never blocks shutdown

    def __init__(self, port: int, score_fn: ScoreFn, faults: Faults = Faults(),
                 api_key: str = ""):
        super().__init__(("127.0.0.1", port), _Handler)
        self.score_fn, self.faults, self.api_key = score_fn, faults, api_key
        self._lock = threading.Lock()
        self.requests_seen = 0

    def next_request_index(self) -> int:
        with self._lock:
            self.requests_seen += 1
            return self.requests_seen - 1


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def log_message(self, fmt, *args):  # quiet: tests read stdout for the port line only
        pass

    def _send(self, code: int, payload: bytes, content_type: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def _error(self, code: int, message: str):
        if self.server.faults.echo_auth:
            message += f" (auth={self.headers.get('Authorization', '')})"
        self._send(code, json.dumps({"error": message}).encode())

    def do_GET(self):
        self._send(200, b'{"ok": true}')

    def do_POST(self):
        srv, faults = self.server, self.server.faults
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        index = srv.next_request_index()
        if srv.api_key and self.headers.get("Authorization", "") != f"Bearer {srv.api_key}":
            return self._error(401, "missing or wrong Authorization bearer token")
        if index < faults.hang_first:
            time.sleep(faults.hang_s)
        if index < faults.fail_first:
            return self._error(500, f"injected failure {index + 1} of {faults.fail_first}")
        try:
            batch = parse_request(json.loads(body))
        except (ValueError, KeyError, TypeError) as e:
            return self._error(400, f"bad request ({type(e).__name__}: {e}); send "
                                    '{"query": [...], "prompts": [...], "labels": [...]} '
                                    '(OpenRLHF) or {"queries": [...], "responses": [...], '
                                    '"labels": [...]}')
        try:
            answer = srv.score_fn(batch)
        except Exception as e:
            return self._error(500, f"scoring raised {type(e).__name__}: {e}")
        if faults.malformed:
            return self._send(200, b'{"rewards": [1.0, 0.0,', "text/plain")
        if faults.wrong_count:
            answer["rewards"] = answer["rewards"][:-1]
        self._send(200, json.dumps(answer).encode())


def parse_request(req) -> RewardBatch:
    """The batch of a request in either format (KeyError/TypeError/ValueError if neither)."""
    if not isinstance(req, dict):
        raise TypeError(f"the body is a JSON {type(req).__name__}, not an object")
    if "query" in req:  # OpenRLHF: the response is what follows the prompt in the query
        queries, labels = list(req["query"]), req.get("labels")
        prompts = list(req.get("prompts") or [""] * len(queries))
        labels = [""] * len(queries) if labels is None else [str(x) for x in labels]
        responses = req.get("responses") or [q[len(p):] if q.startswith(p) else q
                                             for q, p in zip(queries, prompts)]
        messages = req.get("messages") or prompts
        return RewardBatch(list(messages), list(responses), prompts, queries, labels)
    return RewardBatch.from_texts(req["queries"], req["responses"], req["labels"])


def make_score_fn(task: str = "", func: str = "") -> ScoreFn:
    """A batched scorer: a built-in task's reward or a reward_func file's function."""
    if bool(task) == bool(func):
        raise ValueError("give exactly one of --task NAME or --func PATH")
    if task:
        from hpc_rlhf.rewards.task import TaskReward
        source = TaskReward(task)
    else:
        from hpc_rlhf.rewards.func import FuncReward
        source = FuncReward(func)

    lock = threading.Lock()  # last_scores/last_logs belong to one request at a time

    def score(batch: RewardBatch) -> dict:
        with lock:
            answer = {"rewards": source.score(batch).tolist()}
            if getattr(source, "last_scores", None) is not None:
                answer["scores"] = source.last_scores.tolist()
            if getattr(source, "last_logs", None):
                answer["extra_logs"] = dict(source.last_logs)
        return answer
    return score


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", default="", help="built-in task whose reward to serve (arithmetic, "
                                             "repeat, copy)")
    p.add_argument("--func", default="", help="a reward_func.py file to serve")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--fail-first", type=int, default=0, metavar="N")
    p.add_argument("--hang-first", type=int, default=0, metavar="N")
    p.add_argument("--hang-s", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--malformed", action="store_true")
    p.add_argument("--wrong-count", action="store_true")
    p.add_argument("--echo-auth", action="store_true")
    args = p.parse_args(argv)
    try:
        score_fn = make_score_fn(args.task, args.func)
    except Exception as e:
        p.error(str(e))
    faults = Faults(args.fail_first, args.hang_first, args.hang_s, args.malformed,
                    args.wrong_count, args.echo_auth)
    server = RewardServer(args.port, score_fn, faults, api_key=os.environ.get(API_KEY_ENV, ""))
    port = server.server_address[1]
    print(f"hpc_rlhf reward server: port={port} url=http://127.0.0.1:{port}/", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()

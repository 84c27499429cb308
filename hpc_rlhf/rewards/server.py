"""A small reference reward server speaking the protocol of `hpc_rlhf.rewards.remote`.

    python -m hpc_rlhf.rewards.server --task arithmetic --port 0
    python -m hpc_rlhf.rewards.server --func examples/reward_func_example.py --port 8000

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

from hpc_rlhf.rewards.remote import API_KEY_ENV

ScoreFn = Callable[[list, list, list], list]


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
            req = json.loads(body)
            queries, responses, labels = req["queries"], req["responses"], req["labels"]
        except (ValueError, KeyError, TypeError) as e:
            return self._error(400, f"bad request ({type(e).__name__}: {e}); send "
                                    '{"queries": [...], "responses": [...], "labels": [...]}')
        try:
            rewards = [float(r) for r in srv.score_fn(queries, responses, labels)]
        except Exception as e:
            return self._error(500, f"scoring raised {type(e).__name__}: {e}")
        if faults.malformed:
            return self._send(200, b'{"rewards": [1.0, 0.0,', "text/plain")
        if faults.wrong_count:
            rewards = rewards[:-1]
        self._send(200, json.dumps({"rewards": rewards}).encode())


def make_score_fn(task: str = "", func: str = "") -> ScoreFn:
    """A batched scorer: a built-in task's reward or a reward_func file's function."""
    if bool(task) == bool(func):
        raise ValueError("give exactly one of --task NAME or --func PATH")
    if task:
        from hpc_rlhf.data.tasks import task_name, task_reward
        reward = task_reward(task_name(task))
        return lambda q, r, lab: [reward(x, y) for x, y in zip(r, lab)]
    from hpc_rlhf.rewards.func import FuncReward
    source = FuncReward(func)
    return lambda q, r, lab: source.score(q, r, lab).tolist()


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

"""OpenRLHF's remote reward protocol, both ways, over loopback HTTP.

`OpenRLHFStyleServer` is written here from OpenRLHF's documented interface (POST
{"query", "prompts", "labels"}, answer {"rewards", "scores", "extra_logs"}); it reads only those
keys and fails with a KeyError on anything else, as such servers do. `openrlhf_style_post`
is a client that sends exactly what OpenRLHF's sends.
"""
import json
import re
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from testlib import ServedInThread

from hpc_rlhf.rewards import RemoteReward, RewardBatch, RewardError
from hpc_rlhf.rewards.server import RewardServer, make_score_fn

pytestmark = pytest.mark.distributed

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
PROMPTS = [f"<|user|>What is {a}+{b}? Put it in \\boxed{{}}.<|assistant|>"
           for a in range(4) for b in range(5)]
LABELS = [str(a + b) for a in range(4) for b in range(5)]
RESPONSES = [f"It is \\boxed{{{int(lab) + (i % 3 == 0)}}}" for i, lab in enumerate(LABELS)]
BATCH = RewardBatch(messages=[p[8:-13] for p in PROMPTS], responses=RESPONSES, prompts=PROMPTS,
                    queries=[p + r + "</s>" for p, r in zip(PROMPTS, RESPONSES)], labels=LABELS)
WANT = torch.tensor([0.0 if i % 3 == 0 else 1.0 for i in range(len(LABELS))])


class _OpenRLHFHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        try:
            queries, prompts, labels = body["query"], body["prompts"], body["labels"]
        except KeyError as e:  # what an unhandled KeyError looks like from a small server
            return self._answer(500, {"error": f"KeyError: {e}"})
        rewards = []
        for q, p, lab in zip(queries, prompts, labels):
            found = BOXED.findall(q[len(p):])
            rewards.append(1.0 if found and found[-1] == lab else 0.0)
        self._answer(200, {"rewards": rewards, "scores": rewards,
                           "extra_logs": {"n_boxed": [float(len(BOXED.findall(q)))
                                                      for q in queries]}})

    def _answer(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def openrlhf_style_server() -> ServedInThread:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenRLHFHandler)
    server.bodies = []
    return ServedInThread(server, "/get_reward")


def openrlhf_style_post(url: str, queries, prompts, labels) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps({"query": queries, "prompts": prompts, "labels": labels}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def test_default_client_speaks_openrlhf_to_their_server():
    with openrlhf_style_server() as s:
        rc = RemoteReward(s.url, chunk_size=8, retries=0)
        got = rc.score(BATCH)
        # chunks are in flight together: order the bodies the server got by their first query
        bodies = sorted(s.server.bodies, key=lambda b: BATCH.queries.index(b["query"][0]))
    assert torch.equal(got, WANT)
    assert torch.equal(rc.last_scores, WANT)
    assert rc.last_logs == {"n_boxed": pytest.approx(2.0)}     # the prompt's and the answer's
    assert len(bodies) == 3                                     # chunks of 8, 8, 4
    assert bodies[0]["query"] == BATCH.queries[:8] and bodies[0]["prompts"] == PROMPTS[:8]
    assert bodies[2]["labels"] == LABELS[16:]


def test_our_format_against_their_server_names_the_option_and_is_not_retried():
    with openrlhf_style_server() as s:
        rc = RemoteReward(s.url, retries=5, backoff_s=0.01, protocol="hpc_rlhf")
        with pytest.raises(RewardError, match=r"HTTP 500.*other request format.*"
                                              r"set reward.remote_protocol=openrlhf") as e:
            rc.score(BATCH.rows(0, 2))
        assert len(s.server.bodies) == 1 and rc.last_attempts == 1
    assert "'query'" in str(e.value)


def test_their_client_against_our_server():
    server = RewardServer(0, make_score_fn(task="arithmetic"))
    with ServedInThread(server) as s:
        answer = openrlhf_style_post(s.url, ["<|user|>1+2<|assistant|>3</s>",
                                             "<|user|>1+2<|assistant|>4</s>"],
                                     ["<|user|>1+2<|assistant|>"] * 2, ["3", "3"])
    assert answer["rewards"] == [1.0, 0.0]


def test_our_server_reads_our_format_too_and_refuses_neither():
    server = RewardServer(0, make_score_fn(task="arithmetic"))
    with ServedInThread(server) as s:
        got = RemoteReward(s.url, protocol="hpc_rlhf", retries=0).score(
            RewardBatch.from_texts(["1+2", "1+2"], ["3", "5"], ["3", "3"]))
        assert got.tolist() == [1.0, 0.0]
        request = urllib.request.Request(s.url, data=b'{"texts": ["a"]}', method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and b"query" in e.value.read()


def test_several_urls_share_the_batch_in_order():
    with openrlhf_style_server() as a, openrlhf_style_server() as b:
        rc = RemoteReward(f"{a.url}, {b.url}", chunk_size=64, retries=0)
        got = rc.score(BATCH.rows(0, 7))
        got_a = [q for body in a.server.bodies for q in body["query"]]
        got_b = [q for body in b.server.bodies for q in body["query"]]
    assert torch.equal(got, WANT[:7])
    assert got_a == BATCH.queries[:4] and got_b == BATCH.queries[4:7]   # contiguous, ceil(7/2)


def test_a_plain_500_says_to_check_the_protocol_after_retries():
    class Always500(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.send_header("Content-Length", "21")
            self.end_headers()
            self.wfile.write(b"Internal Server Error")

    with ServedInThread(ThreadingHTTPServer(("127.0.0.1", 0), Always500)) as s:
        with pytest.raises(RewardError, match=r"failed 2 times.*if the server expects the other "
                                              r"request format, set reward.remote_protocol="
                                              r"hpc_rlhf"):
            RemoteReward(s.url, retries=1, backoff_s=0.01).score(BATCH.rows(0, 1))


def test_our_style_function_served_to_the_default_client_sees_dataset_prompts(tmp_path):
    """A `reward_func(queries, responses, labels)` file behind our server, called by our client
    in OpenRLHF's format: queries are still the dataset prompts (sent as "messages"), not the
    templated prompts."""
    path = tmp_path / "ours.py"
    path.write_text("def reward_func(queries, responses, labels):\n"
                    "    return [float(q.startswith('What is') and r.startswith('It is'))\n"
                    "            for q, r in zip(queries, responses)]\n")
    with ServedInThread(RewardServer(0, make_score_fn(func=str(path)))) as s:
        got = RemoteReward(s.url, retries=0).score(BATCH.rows(0, 4))
    assert got.tolist() == [1.0] * 4


def test_mismatch_is_read_from_the_other_protocols_keys_only():
    from hpc_rlhf.rewards.remote import protocol_mismatch
    assert protocol_mismatch("openrlhf", 500, "KeyError: 'queries'")
    assert protocol_mismatch("hpc_rlhf", 500, "KeyError: 'query'")
    # a strict server refusing the extra keys our OpenRLHF-format body carries is not told to
    # switch formats (the other format would fail as well)
    assert not protocol_mismatch("openrlhf", 422, "extra field 'responses' not permitted")
    assert not protocol_mismatch("openrlhf", 422, "extra field 'messages' not permitted")

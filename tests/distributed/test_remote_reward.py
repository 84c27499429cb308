"""Remote rewards over loopback HTTP: the client against the reference server, faults injected.

Most cases run the server in a thread of this process (real sockets, 127.0.0.1); one runs the
`python -m hpc_rlhf.rewards.server` CLI as a subprocess. Every case is bounded in time.
"""
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from testlib import ServedInThread, scaled

from hpc_rlhf.data.tasks import make_task, task_reward
from hpc_rlhf.rewards import RemoteReward, RewardBatch, RewardError
from hpc_rlhf.rewards.remote import API_KEY_ENV, mask_url
from hpc_rlhf.rewards.server import Faults, RewardServer, make_score_fn

pytestmark = pytest.mark.distributed

SAMPLES = make_task("task:arithmetic", 150, seed=3)        # > 2 chunks of 64
QUERIES = [s.prompt for s in SAMPLES]
LABELS = [s.label for s in SAMPLES]
RESPONSES = [s.answer if i % 3 else f"{s.answer}1 no" for i, s in enumerate(SAMPLES)]
SECRET = "sk-TOPSECRET-123456"
BATCH = RewardBatch.from_texts(QUERIES, RESPONSES, LABELS)
ONE = RewardBatch.from_texts(["q"], ["1"], ["1"])


def naive_rewards(responses, labels):
    reward = task_reward("task:arithmetic")
    return torch.tensor([reward(r, lab) for r, lab in zip(responses, labels)])


class TimedServer(RewardServer):
    """The reference server, noting when each request arrived: a time bound on retries is
    measured between the requests themselves, not around the whole client call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals = []

    def next_request_index(self) -> int:
        self.arrivals.append(time.monotonic())
        return super().next_request_index()


class Served(ServedInThread):
    """The reference RewardServer on a free loopback port, served from a daemon thread."""

    def __init__(self, faults=Faults(), api_key=""):
        super().__init__(TimedServer(0, make_score_fn(task="arithmetic"), faults,
                                     api_key=api_key), "/score")


def client(url, **kw):
    kw = {"timeout_s": scaled(2.0), "retries": 2, "backoff_s": 0.05, **kw}
    return RemoteReward(url, **kw)


def test_scores_equal_local_task_reward_in_chunks():
    with Served() as s:
        rc = client(s.url, chunk_size=64)
        got = rc.score(BATCH)
        assert s.server.requests_seen == 3                   # 64 + 64 + 22
    assert got.dtype == torch.float32 and got.shape == (len(SAMPLES),)
    assert torch.equal(got, naive_rewards(RESPONSES, LABELS))
    assert 0 < got.sum() < len(SAMPLES)                      # both outcomes present


def test_serves_a_reward_func_file():
    from pathlib import Path

    from hpc_rlhf.rewards import FuncReward
    example = Path(__file__).resolve().parents[2] / "examples" / "reward_func_example.py"
    srv = Served()
    srv.server.score_fn = make_score_fn(func=str(example))
    with srv as s:
        got = client(s.url, chunk_size=16).score(BATCH)
    assert torch.equal(got, FuncReward(example).score(BATCH))


def test_one_timeout_then_success_is_retried_within_bound():
    timeout, bound = scaled(1.0), scaled(4.0)
    # The hang outlasts the bound by far: a client that waited for the answer cannot pass.
    with Served(Faults(hang_first=1, hang_s=3 * bound)) as s:
        rc = client(s.url, timeout_s=timeout, retries=2)
        got = rc.score(BATCH.rows(0, 8))
        arrivals = list(s.server.arrivals)
    assert torch.equal(got, naive_rewards(RESPONSES[:8], LABELS[:8]))
    assert rc.last_attempts == 2 and len(arrivals) == 2, arrivals
    assert arrivals[1] - arrivals[0] < bound       # one client timeout (+ backoff), not the hang


def test_persistent_500_fails_clearly_after_retries():
    with Served(Faults(fail_first=10**6)) as s:
        rc = client(s.url, retries=3, backoff_s=0.05)
        with pytest.raises(RewardError) as e:
            rc.score(BATCH.rows(0, 4))
        assert s.server.requests_seen == 4                   # 1 try + 3 retries
        arrivals = s.server.arrivals
    msg = str(e.value)
    assert "failed 4 times" in msg and "HTTP 500" in msg and "not scored" in msg
    assert "remote_retries=3" in msg
    # Exponential backoff 0.05, 0.1, 0.2 s between the tries (a lower bound: load only adds),
    # and no more than that plus slack (not, say, the 1 s default backoff).
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(g >= 0.05 * 2 ** i for i, g in enumerate(gaps)), gaps
    assert arrivals[-1] - arrivals[0] < scaled(3.0), gaps


def test_connection_refused_is_retried_then_clear_error():
    # A port bound but not listening refuses every connection, and stays ours for the whole
    # test (a just-closed server's port could be taken by anyone in between).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/score"
        with pytest.raises(RewardError, match="failed 3 times.*cannot connect"):
            client(url, retries=2).score(ONE)


def test_malformed_json_fails_without_retry():
    with Served(Faults(malformed=True)) as s:
        with pytest.raises(RewardError, match="malformed JSON") as e:
            client(s.url, retries=5).score(BATCH.rows(0, 3))
        assert s.server.requests_seen == 1
    assert '{"rewards": [one finite float per sample' in str(e.value)


def test_wrong_count_fails_without_retry():
    with Served(Faults(wrong_count=True)) as s:
        with pytest.raises(RewardError, match="returned 4 rewards for a batch of 5"):
            client(s.url, retries=5).score(BATCH.rows(0, 5))
        assert s.server.requests_seen == 1


def test_api_key_is_sent_and_never_appears_in_errors(monkeypatch):
    monkeypatch.setenv("RW_TOKEN", SECRET)
    monkeypatch.setenv(API_KEY_ENV, "${RW_TOKEN}")           # the key itself may be a reference
    with Served(api_key=SECRET) as ok:
        port = ok.server.server_address[1]
        monkeypatch.setenv("RW_HOST_PORT", f"127.0.0.1:{port}")
        got = client("http://${RW_HOST_PORT}/score?token=${RW_TOKEN}").score(
            BATCH.rows(0, 4))
        assert torch.equal(got, naive_rewards(RESPONSES[:4], LABELS[:4]))
    # A leaky server echoes the Authorization header in its 500s; a URL holds credentials.
    with Served(Faults(fail_first=10**6, echo_auth=True), api_key=SECRET) as bad:
        port = bad.server.server_address[1]
        url = f"http://user:{SECRET}@127.0.0.1:{port}/score?token=${{RW_TOKEN}}"
        rc = client(url, retries=1)
        with pytest.raises(RewardError) as e:
            rc.score(BATCH.rows(0, 2))
    text = str(e.value) + repr(rc) + str(e.value.__cause__) + str(e.value.__context__)
    assert "HTTP 500" in str(e.value) and "auth=Bearer ***" in str(e.value)
    assert SECRET not in text
    monkeypatch.delenv(API_KEY_ENV)
    with Served(api_key=SECRET) as s:                         # no key -> 401, clear, no retry
        with pytest.raises(RewardError, match=f"HTTP 401.*check {API_KEY_ENV}"):
            client(s.url).score(ONE)
        assert s.server.requests_seen == 1


def test_missing_env_reference_names_the_variable(monkeypatch):
    monkeypatch.delenv("RW_UNSET_VAR", raising=False)
    with pytest.raises(RewardError, match=r"\$\{RW_UNSET_VAR\}.*not set"):
        client("http://${RW_UNSET_VAR}/x").score(ONE)


def test_mask_url():
    assert mask_url("https://u:pw@h:1/p?key=abc&x=1") == "https://u:***@h:1/p?key=***&x=***"
    assert mask_url("http://${HOST}/score") == "http://${HOST}/score"


def _read_port(proc, deadline_s=120.0):
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=scaled(deadline_s))
    except queue.Empty:
        raise AssertionError(f"reward server printed no port line in {scaled(deadline_s):.0f} s")
    m = re.search(r"port=(\d+)", line)
    assert m, f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.poll() else ''}"
    return int(m.group(1))


def test_cli_server_survives_one_injected_timeout():
    proc = subprocess.Popen([sys.executable, "-m", "hpc_rlhf.rewards.server", "--task",
                             "arithmetic", "--port", "0", "--hang-first", "1",
                             "--hang-s", str(scaled(20))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = _read_port(proc)
        rc = client(f"http://127.0.0.1:{port}/score", timeout_s=scaled(1.0), retries=2)
        got = rc.score(BATCH)
        assert torch.equal(got, naive_rewards(RESPONSES, LABELS))
        assert rc.last_attempts == 4                          # 3 chunks, the first one twice
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            proc.kill()


def test_probe_passes_a_listening_server_and_names_the_one_that_is_not(monkeypatch):
    """Rank 0 probes every server before any model loads (hpc_rlhf.launch.main)."""
    from hpc_rlhf.rewards.remote import probe_servers
    with socket.socket() as up, socket.socket() as down:
        up.bind(("127.0.0.1", 0))
        up.listen()
        down.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        good, bad = up.getsockname()[1], down.getsockname()[1]
        monkeypatch.setenv("RM_HOST", "127.0.0.1")
        probe_servers(f"http://${{RM_HOST}}:{good}/score", budget_s=scaled(5))
        start = time.monotonic()
        with pytest.raises(RewardError) as e:
            probe_servers(f"http://127.0.0.1:{good}/a, http://127.0.0.1:{bad}/b", budget_s=1.0,
                          poll_s=0.2)
        assert time.monotonic() - start < scaled(10)
    msg = str(e.value)
    assert f"http://127.0.0.1:{bad}/b (ConnectionRefusedError" in msg and f":{good}/a" not in msg
    assert msg.startswith("reward.remote_url: no connection within 1 s")

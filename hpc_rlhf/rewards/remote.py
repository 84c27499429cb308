"""Rewards from HTTP servers: `reward.source=remote reward.remote_url=http://host:port/path`.

Protocols (`reward.remote_protocol`), one POST per chunk of at most `chunk_size` samples, up to
`max_concurrency` chunks in flight at once; JSON, UTF-8:

    openrlhf (default; what OpenRLHF's client sends and its example servers read)
      request : {"query": [prompt + response as the model saw them, ...],
                 "prompts": [prompt as the model saw it, ...], "labels": [str, ...],
                 "responses": [generated text, special tokens removed, ...],
                 "messages": [the dataset's prompt, ...]}
                (servers written for OpenRLHF ignore the two extra keys)
    hpc_rlhf
      request : {"queries": [the dataset's prompt, ...], "responses": [generated text, ...],
                 "labels": [str, ...]}
    response (both): {"rewards": [float, ...]}, same length and order; optional "scores"
      ([float, ...], what dynamic filtering looks at) and "extra_logs" ({name: [float, ...] or
      a number}, logged as batch means); other keys are ignored
    headers : Content-Type: application/json; Authorization: Bearer $HPC_RLHF_REWARD_API_KEY
              when that variable is set, else Basic auth from a user:password@ in the URL

Several URLs, comma-separated (as OpenRLHF's --remote_rm_url), split each batch into one
contiguous share per server. `python -m hpc_rlhf.rewards.server` is a reference server that
reads either protocol.

Failures. A request that times out (`timeout_s` per socket operation: connect, or waiting for
the response), cannot connect, or gets HTTP 5xx / 408 / 429 is retried `retries` times with
exponential backoff (backoff_s, 2*backoff_s, ... capped at max_backoff_s); then `RewardError`.
Answers that cannot be right on a retry (other 4xx, malformed JSON, no "rewards", wrong count,
NaN) fail at once, and so does an error whose body shows the server expects the other
protocol's keys: that error names `reward.remote_protocol`. A step is never scored 0 on a
failure.

Secrets. The URL and the key may hold `${ENV_VAR}` references, expanded at every call (so a
rotated token is picked up). Errors show the URL as configured (references unexpanded) with
any user:password and query values masked, and any text echoed from the server has the key,
the password and expanded values replaced by '***'. Nothing here logs.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from hpc_rlhf.rewards.base import RewardBatch, RewardError, parse_reward_answer

API_KEY_ENV = "HPC_RLHF_REWARD_API_KEY"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RETRY_STATUS = {408, 429}
PROTOCOLS = ("openrlhf", "hpc_rlhf")
# The request keys of each protocol, and the batch field each one carries.
REQUEST_KEYS = {"openrlhf": (("query", "queries"), ("prompts", "prompts"), ("labels", "labels")),
                "hpc_rlhf": (("queries", "messages"), ("responses", "responses"),
                             ("labels", "labels"))}


# Keys sent besides the protocol's own: they spare a server the text surgery (the query's
# special tokens); servers written for OpenRLHF ignore them.
EXTRA_KEYS = {"openrlhf": (("responses", "responses"), ("messages", "messages")), "hpc_rlhf": ()}


def request_body(protocol: str, batch: RewardBatch) -> dict:
    """The JSON object one request of `protocol` carries for `batch`."""
    return {key: list(getattr(batch, field))
            for key, field in REQUEST_KEYS[protocol] + EXTRA_KEYS[protocol]}


def _sent_keys(protocol: str) -> set:
    return {key for key, _ in REQUEST_KEYS[protocol] + EXTRA_KEYS[protocol]}


def protocol_mismatch(protocol: str, status: int, body: str) -> bool:
    """Whether an error answer reads as a server expecting the other protocol: a 4xx/5xx whose
    body names a key only the other protocol sends (a KeyError, a validation error)."""
    if status < 400:
        return False
    other = {k for p in PROTOCOLS if p != protocol for k, _ in REQUEST_KEYS[p]} \
        - _sent_keys(protocol)
    return any(re.search(rf"['\"]{re.escape(k)}['\"]", body) for k in other) or \
        (status == 422 and any(k in body for k in other))


def expand_env(text: str, what: str) -> tuple[str, list[str]]:
    """(text with ${VAR} replaced from the environment, the substituted values)."""
    values = []

    def sub(m):
        name = m.group(1)
        if name not in os.environ:
            raise RewardError(f"{what} refers to ${{{name}}} but the environment variable {name} "
                              f"is not set; export it before the job starts (or in launch.setup)")
        values.append(os.environ[name])
        return os.environ[name]

    return _ENV_REF.sub(sub, text), values


def probe_servers(url_list: str, budget_s: float, poll_s: float = 2.0) -> None:
    """Before any model loads (rank 0): every server of `url_list` (comma-separated, ${VAR}
    expanded) accepts a TCP connection within `budget_s`; RewardError names the ones that do
    not. Only the port is tried: no request is sent, so any server implementation passes."""
    pending = {}
    for template in (u.strip() for u in url_list.split(",") if u.strip()):
        url = expand_env(template, "reward.remote_url")[0]
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        pending[mask_url(template)] = (parts.hostname or "", port)
    deadline, last = time.monotonic() + budget_s, {}
    while pending:
        for shown, (host, port) in list(pending.items()):
            try:
                socket.create_connection((host, port), timeout=min(5.0, budget_s)).close()
                del pending[shown]
            except OSError as e:
                last[shown] = f"{type(e).__name__}: {e}"
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if pending:
        names = "; ".join(f"{u} ({last[u]})" for u in pending)
        raise RewardError(f"reward.remote_url: no connection within {budget_s:.0f} s to {names}; "
                          "start the reward server first (or fix the URL), then resubmit: "
                          "nothing was loaded yet")


def mask_url(url: str) -> str:
    """The URL with its password and query values replaced by '***' (references kept)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = "&".join(f"{k}=***" for k, _ in urllib.parse.parse_qsl(parts.query,
                                                                  keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def mask_urls(text: str) -> str:
    """`mask_url` of each URL of a comma-separated list."""
    return ",".join(mask_url(u.strip()) for u in text.split(","))


def _url_secrets(url: str) -> list[str]:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]
    out = [v for _, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    if parts.password:
        out += [parts.password, urllib.parse.unquote(parts.password)]
    return out


def _split_userinfo(url: str) -> tuple[str, str]:
    """(url without user:password@, base64 'user:password' for Basic auth or '')."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, ""
    userinfo, host = parts.netloc.rsplit("@", 1)
    token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), token


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every secret (longest first, 3+ chars) replaced by '***'."""
    for s in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


class RemoteReward:
    """`RewardSource` that POSTs batches to a reward server (protocol in the module doc)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 3,
                 chunk_size: int = 64, max_concurrency: int = 4, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, api_key_env: str = API_KEY_ENV,
                 protocol: str = "openrlhf"):
        if not url:
            raise ValueError("reward.remote_url is empty; give http(s)://host:port/path")
        if protocol not in PROTOCOLS:
            raise ValueError(f"reward.remote_protocol={protocol!r} is not one of {PROTOCOLS}")
        if timeout_s <= 0 or retries < 0 or chunk_size < 1 or max_concurrency < 1 \
                or backoff_s < 0:
            raise ValueError(f"RemoteReward needs timeout_s > 0 (got {timeout_s}), retries >= 0 "
                             f"(got {retries}), chunk_size >= 1 (got {chunk_size}), "
                             f"max_concurrency >= 1 (got {max_concurrency}), backoff_s >= 0 "
                             f"(got {backoff_s})")
        self.urls = [u.strip() for u in url.split(",") if u.strip()]
        for one in self.urls:
            if urllib.parse.urlsplit(one).scheme not in ("http", "https"):
                raise ValueError(f"reward.remote_url={mask_url(one)!r} must start with http:// "
                                 "or https:// (several servers: comma-separated URLs)")
        if not self.urls:
            raise ValueError("reward.remote_url holds no URL; give http(s)://host:port/path")
        self.url = url  # the template: ${VAR} references stay unexpanded until a call
        self.display_url = ",".join(mask_url(u) for u in self.urls)
        self.protocol = protocol
        self.timeout_s, self.retries, self.chunk_size = float(timeout_s), int(retries), chunk_size
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.max_concurrency = max_concurrency
        self.api_key_env = api_key_env
        self._lock = threading.Lock()
        self.last_attempts = 0  # requests sent by the last `score` call (a metric)
        self.last_scores: torch.Tensor | None = None  # [B] when every answer had "scores"
        self.last_logs: dict[str, float] = {}          # batch means of "extra_logs"

    def __repr__(self) -> str:
        return (f"RemoteReward({self.display_url!r}, timeout_s={self.timeout_s}, "
                f"retries={self.retries})")

    def score(self, batch: RewardBatch) -> torch.Tensor:
        n = len(batch)
        shares = -(-n // len(self.urls)) if n else 1  # contiguous share per server (ceil)
        jobs = [(i, start, min(start + self.chunk_size, (i + 1) * shares, n))
                for i in range(len(self.urls))
                for start in range(i * shares, min((i + 1) * shares, n), self.chunk_size)]
        targets = [self._target(u) for u in self.urls]
        self.last_attempts = 0

        def one_chunk(job):
            i, start, end = job
            url, headers, secrets, display = targets[i]
            body = json.dumps(request_body(self.protocol, batch.rows(start, end))).encode()
            where = f"remote reward server {display} (samples {start}..{end - 1} of {n})"
            raw = self._post_with_retries(url, body, headers, where, secrets)
            return self._parse(raw, end - start, where, secrets)

        if len(jobs) <= 1 or self.max_concurrency == 1:
            parts = [one_chunk(j) for j in jobs]
        else:  # chunks in flight together; map keeps their order and raises the first error
            with ThreadPoolExecutor(min(self.max_concurrency, len(jobs))) as pool:
                parts = list(pool.map(one_chunk, jobs))
        if not parts:
            self.last_scores, self.last_logs = None, {}
            return torch.zeros(0, dtype=torch.float32)
        sizes = [end - start for _, start, end in jobs]
        rewards = torch.cat([p[0] for p in parts])                                     # [B]
        self.last_scores = (torch.cat([p[1] for p in parts])
                            if all(p[1] is not None for p in parts) else None)
        names = set().union(*(p[2] for p in parts))
        self.last_logs = {k: sum(p[2].get(k, 0.0) * m for p, m in zip(parts, sizes)) / sum(
            m for p, m in zip(parts, sizes) if k in p[2]) for k in names}
        return rewards

    def _target(self, template: str) -> tuple[str, dict, list[str], str]:
        """(URL to post to, headers, secrets to scrub, URL to show) for one configured URL."""
        url, url_values = expand_env(template, "reward.remote_url")
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "hpc_rlhf-reward-client"}
        secrets = url_values + _url_secrets(url)
        url, basic = _split_userinfo(url)  # urllib cannot send user:password@ itself
        key = os.environ.get(self.api_key_env, "")
        if key:
            key, key_values = expand_env(key, self.api_key_env)
            headers["Authorization"] = f"Bearer {key}"
            secrets += [key] + key_values
        elif basic:
            headers["Authorization"] = f"Basic {basic}"
        return url, headers, secrets + [basic], mask_url(template)

    # ---- one chunk ---------------------------------------------------------------------------
    def _post_with_retries(self, url: str, body: bytes, headers: dict, where: str,
                           secrets: list[str]) -> bytes:
        failures = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            with self._lock:
                self.last_attempts += 1
            try:
                return self._post(url, body, headers)
            except urllib.error.HTTPError as e:
                detail = scrub(_read_snippet(e), secrets)
                if protocol_mismatch(self.protocol, e.code, detail):
                    other = [p for p in PROTOCOLS if p != self.protocol][0]
                    raise RewardError(
                        f"{where} answered HTTP {e.code} {e.reason}: {detail!r}. The server "
                        f"reads the other request format: this client sent "
                        f"reward.remote_protocol={self.protocol} (keys "
                        f"{[k for k, _ in REQUEST_KEYS[self.protocol]]}); set "
                        f"reward.remote_protocol={other} (keys "
                        f"{[k for k, _ in REQUEST_KEYS[other]]}). Not retried") from None
                if e.code < 500 and e.code not in _RETRY_STATUS:
                    hint = (f" (check {self.api_key_env})" if e.code in (401, 403) else "")
                    raise RewardError(f"{where} answered HTTP {e.code} {e.reason}{hint}: "
                                      f"{detail!r}; not retried (a client error repeats)") from None
                failures.append(f"HTTP {e.code} {e.reason} {detail!r}")
            except (TimeoutError, socket.timeout):
                failures.append(f"timed out after {self.timeout_s:g} s")
            except urllib.error.URLError as e:
                reason = e.reason
                failures.append(f"timed out after {self.timeout_s:g} s"
                                if isinstance(reason, (TimeoutError, socket.timeout))
                                else f"cannot connect: {scrub(str(reason), secrets)}")
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                failures.append(f"{type(e).__name__}: {scrub(str(e), secrets)}")
        other = [p for p in PROTOCOLS if p != self.protocol][0]
        hint = (f"; if the server expects the other request format, set "
                f"reward.remote_protocol={other}" if all(f.startswith("HTTP 5") for f in failures)
                else "")
        raise RewardError(
            f"{where} failed {len(failures)} times ({'; '.join(failures)}); the step is not "
            f"scored. Check that the server is up and answers within reward.remote_timeout_s="
            f"{self.timeout_s:g}, or raise reward.remote_retries={self.retries}{hint}")

    def _post(self, url: str, body: bytes, headers: dict) -> bytes:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
            return resp.read()

    def _parse(self, raw: bytes, expected: int, where: str, secrets: list[str]):
        """(rewards [expected], scores or None, extra_logs means) of one answer."""
        fix = ('The server must answer {"rewards": [one finite float per sample, in order]} '
               "(see hpc_rlhf/rewards/remote.py).")
        snippet = scrub(raw[:200].decode("utf-8", "replace"), secrets)
        try:
            data = json.loads(raw)
        except ValueError:
            raise RewardError(f"{where} answered malformed JSON: {snippet!r}. {fix}") from None
        if not isinstance(data, dict) or "rewards" not in data:
            raise RewardError(f"{where} answered JSON without a 'rewards' list: {snippet!r}. "
                              f"{fix}")
        try:
            return parse_reward_answer(data, expected, where, fix)
        except RewardError as e:
            raise RewardError(scrub(str(e), secrets)) from None


def _read_snippet(err: urllib.error.HTTPError) -> str:
    try:
        return err.read(200).decode("utf-8", "replace")
    except Exception:
        return ""

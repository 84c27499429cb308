"""Rewards from an HTTP server: `reward.source=remote reward.remote_url=http://host:port/score`.

Protocol (one POST per chunk of at most `chunk_size` samples, up to `max_concurrency` chunks
in flight at once; JSON, UTF-8):

    request : {"queries": [str, ...], "responses": [str, ...], "labels": [str, ...]}
    response: {"rewards": [float, ...]}        same length and order; other keys are ignored
    headers : Content-Type: application/json; Authorization: Bearer $HPC_RLHF_REWARD_API_KEY
              when that variable is set, else Basic auth from a user:password@ in the URL

`python -m hpc_rlhf.rewards.server` is a reference server speaking it.

Failures. A request that times out (`timeout_s` per socket operation: connect, or waiting for
the response), cannot connect, or gets HTTP 5xx / 408 / 429 is retried `retries` times with
exponential backoff (backoff_s, 2*backoff_s, ... capped at max_backoff_s); then `RewardError`.
Answers that cannot be right on a retry (other 4xx, malformed JSON, no "rewards", wrong count,
NaN) fail at once. The step is never scored 0 on a failure.

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

from hpc_rlhf.rewards.base import RewardError, as_reward_tensor, check_batch

API_KEY_ENV = "HPC_RLHF_REWARD_API_KEY"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RETRY_STATUS = {408, 429}


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
                 max_backoff_s: float = 30.0, api_key_env: str = API_KEY_ENV):
        if not url:
            raise ValueError("reward.remote_url is empty; give http(s)://host:port/path")
        if timeout_s <= 0 or retries < 0 or chunk_size < 1 or max_concurrency < 1 \
                or backoff_s < 0:
            raise ValueError(f"RemoteReward needs timeout_s > 0 (got {timeout_s}), retries >= 0 "
                             f"(got {retries}), chunk_size >= 1 (got {chunk_size}), "
                             f"max_concurrency >= 1 (got {max_concurrency}), backoff_s >= 0 "
                             f"(got {backoff_s})")
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"reward.remote_url={mask_url(url)!r} must start with http:// or "
                             "https://")
        self.url = url  # the template: ${VAR} references stay unexpanded until a call
        self.display_url = mask_url(url)
        self.timeout_s, self.retries, self.chunk_size = float(timeout_s), int(retries), chunk_size
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.max_concurrency = max_concurrency
        self.api_key_env = api_key_env
        self._lock = threading.Lock()
        self.last_attempts = 0  # requests sent by the last `score` call (a metric)

    def __repr__(self) -> str:
        return (f"RemoteReward({self.display_url!r}, timeout_s={self.timeout_s}, "
                f"retries={self.retries})")

    def score(self, queries: list[str], responses: list[str], labels: list[str]) -> torch.Tensor:
        n = check_batch(queries, responses, labels)
        url, url_values = expand_env(self.url, "reward.remote_url")
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
        secrets += [basic]
        self.last_attempts = 0

        def one_chunk(start: int) -> torch.Tensor:
            end = min(start + self.chunk_size, n)
            body = json.dumps({"queries": list(queries[start:end]),
                               "responses": list(responses[start:end]),
                               "labels": list(labels[start:end])}).encode()
            where = (f"remote reward server {self.display_url} (samples {start}..{end - 1} of "
                     f"{n})")
            raw = self._post_with_retries(url, body, headers, where, secrets)
            return self._parse(raw, end - start, where, secrets)

        starts = list(range(0, n, self.chunk_size))
        if len(starts) <= 1 or self.max_concurrency == 1:
            chunks = [one_chunk(s) for s in starts]
        else:  # chunks in flight together; map keeps their order and raises the first error
            with ThreadPoolExecutor(min(self.max_concurrency, len(starts))) as pool:
                chunks = list(pool.map(one_chunk, starts))
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float32)  # [B]

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
        raise RewardError(
            f"{where} failed {len(failures)} times ({'; '.join(failures)}); the step is not "
            f"scored. Check that the server is up and answers within reward.remote_timeout_s="
            f"{self.timeout_s:g}, or raise reward.remote_retries={self.retries}")

    def _post(self, url: str, body: bytes, headers: dict) -> bytes:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
            return resp.read()

    def _parse(self, raw: bytes, expected: int, where: str, secrets: list[str]) -> torch.Tensor:
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
            return as_reward_tensor(data["rewards"], expected, source=where, fix=fix)
        except RewardError as e:
            raise RewardError(scrub(str(e), secrets)) from None


def _read_snippet(err: urllib.error.HTTPError) -> str:
    try:
        return err.read(200).decode("utf-8", "replace")
    except Exception:
        return ""

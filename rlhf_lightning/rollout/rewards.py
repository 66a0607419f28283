"""Rule-based and remote reward functions.

A reward function maps ``(prompts, responses, labels) -> list[float]`` (one score per response; ``labels`` come
from the prompt data's ``label_key``, ``None`` where absent). Name it as ``path/to/file.py:function`` or
``package.module:function``. Every call is checked: a wrong number of scores, non-numbers or NaN/inf stop the
run with an error naming the function.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import importlib.util
import json
import math
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from rlhf_lightning.errors import ConfigError

RewardFn = Callable[[list[str], list[str], list[str | None]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``file.py:fn`` or ``module:fn``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"Reward function '{spec}' must look like 'path/to/file.py:function' or 'module:function'.")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Reward function file '{target}' (from '{spec}') does not exist.")
        module_spec = importlib.util.spec_from_file_location(f"rlhf_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"Reward function '{spec}': '{target}' has no callable '{name}'.")
    return fn


def checked_scores(fn: RewardFn, name: str, prompts: list[str], responses: list[str],
                   labels: list[str | None]) -> list[float]:
    """Call ``fn`` and validate its output: one finite number per response."""
    scores = fn(prompts, responses, labels)
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise TypeError(f"Reward function '{name}' must return a list of numbers; got {type(scores).__name__}: "
                        f"{err}") from err
    if len(scores) != len(responses):
        raise ValueError(f"Reward function '{name}' returned {len(scores)} scores for {len(responses)} responses.")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"Reward function '{name}' returned NaN/inf for {len(bad)} responses (first at index "
                         f"{bad[0]}: response {responses[bad[0]]!r}).")
    return scores


class RemoteReward:
    """Reward served over HTTP: POSTs ``{"prompts", "responses", "labels"}`` as JSON to ``url`` and expects
    ``{"rewards": [...]}`` back, one score per response.

    ``timeout`` is a deadline for a whole request (connect, send, and every byte of the reply), not a per-read
    socket timeout: a server that trickles its reply cannot stretch a step. Network errors, deadlines, HTTP 429 and
    5xx replies are retried up to ``retries`` times after an exponential, jittered, capped backoff (``backoff`` ·
    2^attempt · U(0.5, 1), at most ``max_backoff`` seconds); any other 4xx reply or a malformed body fails at once
    with what the server said. One call therefore returns or raises within about ``(retries + 1) · timeout`` plus
    the backoffs. Large batches are split into requests of ``batch_size`` rows (``None``: one request), at most
    ``max_concurrency`` of them in flight at once.
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, batch_size: int | None = None,
                 max_concurrency: int = 4, backoff: float = 0.5, max_backoff: float = 8.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"model.init_args.remote_reward_url '{url}' must start with http:// or https://.")
        checks = {"remote_reward_timeout": (timeout, timeout > 0), "remote_reward_retries": (retries, retries >= 0),
                  "remote_reward_batch_size": (batch_size, batch_size is None or batch_size >= 1),
                  "remote_reward_max_concurrency": (max_concurrency, max_concurrency >= 1)}
        for option, (value, ok) in checks.items():
            if not ok:
                raise ConfigError(f"model.init_args.{option} must be positive (retries: >= 0); got {value}.")
        self.url, self.timeout, self.retries = url, float(timeout), retries
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.backoff, self.max_backoff = backoff, max_backoff
        self._random = random.Random()

    def __call__(self, prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
        size = self.batch_size or max(len(responses), 1)
        chunks = [(prompts[i:i + size], responses[i:i + size], labels[i:i + size])
                  for i in range(0, len(responses), size)] or [([], [], [])]
        if len(chunks) == 1:
            return self.score_chunk(*chunks[0])
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(chunks))) as pool:
            futures = [pool.submit(self.score_chunk, *chunk) for chunk in chunks]
            try:
                return [score for future in futures for score in future.result()]
            except BaseException:
                for future in futures:  # do not start the chunks still queued
                    future.cancel()
                raise

    def score_chunk(self, prompts: list[str], responses: list[str], labels: list[str | None]) -> list:
        """One request's scores, with retries; raises ``RuntimeError`` naming the URL when it cannot get them."""
        body = json.dumps({"prompts": prompts, "responses": responses, "labels": labels}).encode()
        for attempt in range(self.retries + 1):
            try:
                status, payload = self.post(body)
            except (OSError, http.client.HTTPException) as err:  # refused, unreachable, reset, past the deadline
                if attempt == self.retries:
                    raise RuntimeError(f"Remote reward {self.url} failed after {attempt + 1} attempts "
                                       f"(timeout {self.timeout:g}s each): {err or type(err).__name__}") from err
            else:
                if status < 300:
                    break
                if not retryable_status(status) or attempt == self.retries:
                    detail = payload[:500].decode(errors="replace")
                    raise RuntimeError(f"Remote reward {self.url} answered HTTP {status} (attempt {attempt + 1}): "
                                       f"{detail}")
            time.sleep(backoff_delay(attempt, self.backoff, self.max_backoff, self._random))
        try:
            return json.loads(payload)["rewards"]
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(f"Remote reward {self.url} must answer JSON {{\"rewards\": [...]}}; got "
                               f"{payload[:200]!r}") from err

    def post(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` once and return (status, reply body), all within ``timeout`` seconds: a watchdog timer
        shuts the socket down at the deadline, which ends any read in progress (a per-read socket timeout would
        let a server that sends one byte a second keep the call alive indefinitely)."""
        parts = urllib.parse.urlsplit(self.url)
        connection_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_cls(parts.hostname, parts.port, timeout=self.timeout)
        expired, sockets = threading.Event(), []

        def abort() -> None:
            expired.set()
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(self.timeout, abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.connect()  # bounded by the socket timeout; the reply may outlive ``connection.sock``
            sockets.append(connection.sock)
            if expired.is_set():
                raise TimeoutError("connected only at the deadline")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            payload = reply.read()
        except (OSError, http.client.HTTPException) as err:
            if expired.is_set():
                raise TimeoutError(f"no complete reply within {self.timeout:g}s") from err
            raise
        finally:
            watchdog.cancel()
            connection.close()
        if expired.is_set():  # a reply without Content-Length reads as complete when the socket is shut
            raise TimeoutError(f"no complete reply within {self.timeout:g}s")
        return reply.status, payload


def retryable_status(status: int) -> bool:
    """HTTP statuses worth another try: rate limiting (429) and server errors (5xx)."""
    return status == 429 or status >= 500


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt + 1``: exponential in the attempt, capped at ``cap``, with "equal
    jitter" (a uniform draw from the upper half), so many clients retrying together spread out."""
    return min(cap, base * 2**attempt) * rng.uniform(0.5, 1.0)


def combine_rewards(source_scores: torch.Tensor, weights: Sequence[float] | None = None,
                    clip: float | None = None) -> torch.Tensor:
    """The reward of each response from every source's scores: ``clip(sum_s w_s * score_s)``.

    ``source_scores`` is (sources, N) in the order reward models, functions, remote server (as
    :func:`source_names`); ``weights`` default to 1 each; ``clip`` bounds the sum to [-clip, clip] (``None``: not
    clipped). PPO's rollouts, batch scoring and evaluation all combine rewards here, so a score means the same
    thing in each."""
    weights = torch.tensor(list(weights) if weights is not None else [1.0] * len(source_scores),
                           dtype=source_scores.dtype, device=source_scores.device)
    if len(weights) != len(source_scores):
        raise ValueError(f"{len(weights)} reward weights for {len(source_scores)} reward sources.")
    combined = (weights[:, None] * source_scores).sum(0)
    return combined.clamp(-clip, clip) if clip is not None else combined


def source_names(reward_models: list[str], reward_functions: list[str], remote_url: str | None) -> list[str]:
    """Short, distinct names of the reward sources for the logs (``train/reward/<name>``), in the order the scores
    are combined: each reward model's directory name (its parent's for the ``hf`` export folder this project's
    configs write), each function's name, the remote server's host."""
    models = [Path(p.rstrip("/")) for p in reward_models]
    names = [p.parent.name if p.name == "hf" and p.parent.name else p.name for p in models]
    names += [spec.rpartition(":")[2] for spec in reward_functions]
    if remote_url:
        names.append(urllib.parse.urlsplit(remote_url).hostname or remote_url)
    return unique_names(names)


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats numbered (``a``, ``a_1``), so two sources never share a metric."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_{count}")
    return out

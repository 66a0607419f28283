"""Rule-based and remote reward functions.

A reward function maps ``(prompts, responses, labels) -> list[float]`` (one score per response; ``labels`` come
from the prompt data's ``label_key``, ``None`` where absent). Name it as ``path/to/file.py:function`` or
``package.module:function``. Every call is checked: a wrong number of scores, non-numbers or NaN/inf stop the
run with an error naming the function.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

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
    ``{"rewards": [...]}`` back within ``timeout`` seconds. Network errors, timeouts and 5xx replies are retried
    ``retries`` times; a 4xx reply or a malformed body fails at once with what the server said."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote_reward_url '{url}' must start with http:// or https://.")
        self.url, self.timeout, self.retries = url, timeout, retries

    def __call__(self, prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
        body = json.dumps({"prompts": prompts, "responses": responses, "labels": labels}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    payload = reply.read()
                break
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == self.retries:
                    detail = err.read()[:500].decode(errors="replace")
                    raise RuntimeError(f"Remote reward {self.url} answered HTTP {err.code}: {detail}") from err
            except (OSError, TimeoutError) as err:  # refused, unreachable, timed out
                if attempt == self.retries:
                    raise RuntimeError(f"Remote reward {self.url} failed after {attempt + 1} attempts "
                                       f"(timeout {self.timeout}s): {err}") from err
        try:
            return json.loads(payload)["rewards"]
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(f"Remote reward {self.url} must answer JSON {{\"rewards\": [...]}}; got "
                               f"{payload[:200]!r}") from err

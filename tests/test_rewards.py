"""Remote reward over real HTTP servers on 127.0.0.1: a whole-request deadline, retries with backoff, bounded
concurrency; and the names reward sources are logged under."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.rewards import RemoteReward, backoff_delay, source_names, unique_names


def serve(respond: Callable[[http.server.BaseHTTPRequestHandler, dict], None]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 whose POST handler is ``respond(handler, request_json)``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            respond(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def reply(handler: http.server.BaseHTTPRequestHandler, rewards: list[float], status: int = 200) -> None:
    body = json.dumps({"rewards": rewards}).encode()
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def trickling_server() -> Iterator[str]:
    """Answers 200 with a 100-byte body, one byte every 0.3 s (30 s in all): every single read is quick."""

    def respond(handler: http.server.BaseHTTPRequestHandler, request: dict) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        try:
            for _ in range(100):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.3)
        except OSError:  # the client gave up
            pass

    yield from serve(respond)


def test_timeout_is_a_deadline_for_the_whole_request(trickling_server):
    """A per-read timeout of 1 s never fires against a server sending a byte every 0.3 s; the deadline does."""
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"failed after 1 attempts \(timeout 1s each\).*no complete reply"):
        RemoteReward(trickling_server, timeout=1.0, retries=0)(["p"], ["r"], [None])
    assert 0.9 < time.perf_counter() - started < 1.6
    # With one retry: two deadlines plus one backoff of 0.1-0.2 s.
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="failed after 2 attempts"):
        RemoteReward(trickling_server, timeout=1.0, retries=1, backoff=0.2)(["p"], ["r"], [None])
    assert 2.0 < time.perf_counter() - started < 2.9


def test_retries_429_and_5xx_with_backoff_then_succeeds():
    attempts: list[float] = []

    def respond(handler: http.server.BaseHTTPRequestHandler, request: dict) -> None:
        attempts.append(time.perf_counter())
        status = {1: 503, 2: 429}.get(len(attempts), 200)
        reply(handler, [1.0] * len(request["responses"]), status)

    for url in serve(respond):
        assert RemoteReward(url, retries=2, backoff=0.2)(["p", "p"], ["a", "b"], [None, None]) == [1.0, 1.0]
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert len(attempts) == 3 and 0.1 <= gaps[0] < 0.5 and 0.2 <= gaps[1] < 0.7, gaps  # 0.2·2^k·U(0.5, 1)
        attempts.clear()
        with pytest.raises(RuntimeError, match=r"answered HTTP 503 \(attempt 1\)"):
            RemoteReward(url, retries=0)(["p"], ["a"], [None])


def test_backoff_is_exponential_jittered_and_capped():
    import random

    rng = random.Random(0)
    delays = [[backoff_delay(k, 0.5, 4.0, rng) for k in range(6)] for _ in range(50)]
    for row in delays:
        for k, d in enumerate(row):
            assert 0.5 * min(4.0, 0.5 * 2**k) <= d <= min(4.0, 0.5 * 2**k)
    assert len({round(row[3], 6) for row in delays}) > 40  # jittered: retries of many clients spread out


def test_large_batches_are_split_with_bounded_concurrency():
    in_flight, peak, sizes, lock = [0], [0], [], threading.Lock()

    def respond(handler: http.server.BaseHTTPRequestHandler, request: dict) -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            sizes.append(len(request["responses"]))
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        reply(handler, [float(r) for r in request["responses"]])

    for url in serve(respond):
        responses = [str(i) for i in range(9)]
        started = time.perf_counter()
        scores = RemoteReward(url, batch_size=2, max_concurrency=2)(["p"] * 9, responses, [None] * 9)
        assert scores == [float(i) for i in range(9)]  # order kept across chunks
        assert sorted(sizes) == [1, 2, 2, 2, 2] and peak[0] == 2
        assert time.perf_counter() - started >= 0.6  # 5 requests, 2 at a time: 3 rounds of 0.2 s


def test_remote_reward_options_are_checked():
    with pytest.raises(ConfigError, match="remote_reward_max_concurrency must be positive"):
        RemoteReward("http://127.0.0.1:1/", max_concurrency=0)
    with pytest.raises(ConfigError, match="remote_reward_batch_size"):
        RemoteReward("http://127.0.0.1:1/", batch_size=0)
    with pytest.raises(ConfigError, match="remote_reward_timeout"):
        RemoteReward("http://127.0.0.1:1/", timeout=0)


def test_source_names():
    assert source_names(["runs/tiny-rm/hf", "org/helpful-rm", "org/helpful-rm/"], ["examples/r.py:even", "m.mod:fmt"],
                        "http://rewards.example:8000/score") == ["tiny-rm", "helpful-rm", "helpful-rm_1", "even",
                                                                  "fmt", "rewards.example"]
    assert unique_names(["a", "a", "b", "a"]) == ["a", "a_1", "b", "a_2"]


def test_combine_rewards_is_the_clipped_weighted_sum_of_sources():
    from rlhf_lightning.rollout.rewards import combine_rewards

    sources = torch.tensor([[1.0, -2.0, 30.0], [0.5, 0.5, 0.5]])  # (sources, responses)
    assert combine_rewards(sources).tolist() == [1.5, -1.5, 30.5]
    assert combine_rewards(sources, [2.0, -1.0]).tolist() == [1.5, -4.5, 59.5]
    assert combine_rewards(sources, [2.0, -1.0], clip=10.0).tolist() == [1.5, -4.5, 10.0]
    with pytest.raises(ValueError, match="3 reward weights for 2 reward sources"):
        combine_rewards(sources, [1.0, 1.0, 1.0])

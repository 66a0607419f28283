"""PPO family: rule rewards, rollout engine, GRPO and PPO (with critic) learning on the tiny model."""

import http.server
import json
import math
import socket
import threading

import pytest
import torch
from conftest import REPO, base_args, load_weights, metric_series, read_metrics, run_cli

from rlhf_lightning.rollout.engine import Rollout, RolloutConfig, WorkerGroup
from rlhf_lightning.rollout.rewards import checked_scores, load_reward_fn

PROMPTS = REPO / "examples" / "data" / "prompts_tiny.jsonl"
GRPO_CONFIG = REPO / "configs" / "tiny" / "grpo.yaml"
EVEN = f"{REPO}/examples/reward_fns.py:even_answer"


def rl_args(run_dir, model, *extra: str) -> list[str]:
    args = base_args(run_dir, model, data=PROMPTS, config=GRPO_CONFIG)
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
    callbacks.append({"class_path": "rlhf_lightning.callbacks.SampleTable", "init_args": {"every_n_steps": 5}})
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    # The settings these tests were tuned with (the tiny config itself is tuned for the demo task).
    return args + ["--model.init_args.reward_functions", json.dumps([EVEN]), "--data.init_args.batch_size", "8",
                   "--model.init_args.optimizer.init_args.lr", "2e-3", "--model.init_args.n_samples_per_prompt", "4",
                   "--model.init_args.max_new_tokens", "6", "--model.init_args.temperature", "1.0",
                   "--model.init_args.loss_aggregation", "token_mean", "--model.init_args.micro_batch_size", "32",
                   "--model.init_args.lr_scheduler", "constant", "--model.init_args.warmup_steps", "0", *extra]


def assert_reward_rises(run_dir, start_model):
    rows = read_metrics(run_dir)
    rewards = metric_series(rows, "train/reward")
    assert all(math.isfinite(r) for r in rewards)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert metric_series(rows, "train/policy_version")[-1] == len(rewards)  # one policy update per step
    for key in ("time/generate_s", "time/score_s", "time/train_s", "train/samples_per_sec", "train/kl",
                "train/clip_frac", "train/response_length"):
        assert metric_series(rows, key), key
    assert (run_dir / "csv" / "version_0" / "samples.csv").read_text().count("\n") > 8
    before, after = load_weights(start_model), load_weights(run_dir / "hf")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    return rows


def test_grpo_learns_rule_reward(tmp_path, sft_model_dir):
    """Without a reference (kl_coef 0) and one update per rollout, the old log-probs come from the update's own
    forward pass; the Ray GRPO test below covers the path with a reference model."""
    run_dir = tmp_path / "grpo"
    run_cli(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "12", "--model.init_args.kl_coef", "0"))
    rows = assert_reward_rises(run_dir, sft_model_dir)
    assert set(metric_series(rows, "train/kl")) == {0.0}


def test_ppo_with_critic_learns_rule_reward_on_ray(tmp_path, sft_model_dir, monkeypatch):
    """PPO with a critic (one optimizer, two param groups), generation and reference in separate Ray actors,
    sampling at temperature 0.8: the reference scores at the same temperature, so the first step's KL (policy =
    reference) is zero."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "ppo"
    run_cli(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "12", "--model.init_args.advantage_estimator", "gae",
                    "--model.init_args.temperature", "0.8",
                    "--model.init_args.kl_in_reward", "true", "--model.init_args.critic_learning_rate", "5e-3",
                    "--model.init_args.rollout.backend", "ray", "--model.init_args.rollout.namespace", "test-ppo",
                    "--model.init_args.rollout.generation.num_cpus", "0.5",
                    "--model.init_args.rollout.reference.num_cpus", "0.5"))
    rows = assert_reward_rises(run_dir, sft_model_dir)
    for key in ("train/value_loss", "train/explained_variance", "train/entropy", "train/kl_coef"):
        assert metric_series(rows, key), key
    assert abs(metric_series(rows, "train/kl")[0]) < 1e-4


@pytest.mark.parametrize("estimator", ["dr_grpo", "rloo", "reinforce_pp", "reinforce_baseline"])
def test_other_estimators_train(tmp_path, sft_model_dir, estimator):
    run_dir = tmp_path / estimator
    extra = ["--model.init_args.kl_in_reward", "true"] if estimator.startswith("reinforce") else []
    if estimator == "dr_grpo":
        extra = ["--model.init_args.loss_aggregation", "seq_mean_token_sum"]
    run_cli(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "3", "--model.init_args.advantage_estimator",
                    estimator, *extra))
    rows = read_metrics(run_dir)
    assert len(metric_series(rows, "train/reward")) == 3
    assert all(math.isfinite(v) for v in metric_series(rows, "train/policy_loss"))


def test_logged_stats_are_means_over_mini_batches(tmp_path, sft_model_dir):
    """Entropy logged from 4 mini-batches of 8 (4 optimizer steps) is a mean, on the scale of one big batch."""
    entropy = {}
    for mini in (32, 8):
        run_dir = tmp_path / f"mini{mini}"
        run_cli(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", str(32 // mini), "--model.init_args.kl_coef",
                        "0", "--model.init_args.mini_batch_size", str(mini)))
        entropy[mini] = metric_series(read_metrics(run_dir), "train/entropy")[0]
    assert 0.5 < entropy[8] / entropy[32] < 2, entropy


def test_micro_batch_accumulation_matches_one_big_batch(tmp_path, sft_model_dir):
    """Under DeepSpeed, 4 micro-batches of 4 accumulate to the gradient of one batch of 16 (greedy rollouts, SGD;
    PPO with a critic, and both the policy and the critic are compared), padded or packed (``packing``: each
    micro-batch one padding-free row, the responses' lengths differ). Gradient clipping is off: clipping to a
    norm would hide a wrong gradient scale (e.g. micro-batch losses summed instead of averaged)."""
    common = ["--trainer.max_steps", "1", "--model.init_args.advantage_estimator", "gae",
              "--model.init_args.n_samples_per_prompt", "1", "--model.init_args.temperature", "0",
              "--model.init_args.kl_coef", "0", "--data.init_args.batch_size", "16",
              "--data.init_args.shuffle", "false", "--model.init_args.max_grad_norm", "null",
              "--model.init_args.optimizer", json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}})]
    for micro, packing in ((16, False), (4, False), (4, True)):
        run_dir = tmp_path / f"micro{micro}{'-packed' if packing else ''}"
        args = rl_args(run_dir, sft_model_dir, *common, "--model.init_args.micro_batch_size", str(micro),
                       "--model.init_args.packing", str(packing).lower())
        callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
        callbacks.append({"class_path": "rlhf_lightning.callbacks.HFExport",
                          "init_args": {"dirpath": str(run_dir / "critic"), "attribute": "critic"}})
        args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
        run_cli(args)
    for export, start in (("hf", sft_model_dir), ("critic", sft_model_dir)):
        big = load_weights(tmp_path / "micro16" / export)
        name = "model.embed_tokens.weight"
        assert not torch.equal(load_weights(start)[name], big[name]), export  # the update is not empty
        for run in ("micro4", "micro4-packed"):
            small = load_weights(tmp_path / run / export)
            for name in big:
                torch.testing.assert_close(small[name], big[name], atol=1e-5, rtol=1e-4, msg=f"{run} {export}: {name}")


KL_PROBE = """
import json, os
from lightning.pytorch.callbacks import Callback


class RecordKLCoef(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(os.path.join(os.environ["KL_PROBE_DIR"], f"rank{trainer.global_rank}.jsonl"), "a") as f:
            kl = float(trainer.callback_metrics["train/kl"])  # what the KL controller was updated with
            f.write(json.dumps([pl_module.policy_version, pl_module.kl_controller.value, kl]) + "\\n")
"""


def test_grpo_zero3_two_ranks_and_resume(tmp_path, sft_model_dir):
    """ZeRO-3 on 2 ranks (weights gathered for the push); resuming restores policy version and KL state. The
    adaptive β is updated from the KL of all ranks' samples, so both ranks (which sample different prompts) update
    it with the same KL and keep the same β at every step."""
    from conftest import run_cli_subprocess

    (tmp_path / "kl_probe.py").write_text(KL_PROBE)
    run_dir = tmp_path / "z3"
    args = rl_args(run_dir, sft_model_dir, "--trainer.devices", "2", "--trainer.strategy.init_args.stage", "3",
                   "--data.init_args.batch_size", "4", "--model.init_args.micro_batch_size", "16",
                   "--model.init_args.kl_target", "0.5")
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1]) + [{"class_path": "kl_probe.RecordKLCoef"}]
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}", "KL_PROBE_DIR": str(tmp_path)}
    run_cli_subprocess([*args, "--trainer.max_steps", "5"], env=env)
    run_cli_subprocess([*args, "--trainer.max_steps", "7", "--ckpt_path", "last"], env=env)
    rows = read_metrics(run_dir)
    assert [int(r["step"]) for r in rows if r.get("train/reward")] == [5, 6]
    assert metric_series(rows, "train/policy_version") == [6.0, 7.0]  # continued from the restored version 5
    betas = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [v for v, _, _ in betas[0]] == list(range(1, 8)) and betas[0] == betas[1], betas
    assert all(kl > 0 for _, _, kl in betas[0][1:]), betas  # the policy moved: a real KL to agree on


@pytest.mark.parametrize("strategy", ["deepspeed", "auto"])
def test_gradient_clipping_and_generation_kwargs(tmp_path, sft_model_dir, strategy):
    """``max_grad_norm`` bounds the update (SGD, lr 1: the update is the clipped gradient) under DeepSpeed (engine
    clipping) and without it (Lightning's ``clip_gradients``); ``generation_kwargs`` reach ``generate``. With
    ``kl_coef: 0`` and one update per rollout, the old log-probs come from the update's own forward pass."""
    run_dir = tmp_path / strategy
    extra = ["--trainer.strategy", "auto"] if strategy == "auto" else []
    run_cli(rl_args(run_dir, sft_model_dir, *extra, "--trainer.max_steps", "1", "--model.init_args.kl_coef", "0",
                    "--model.init_args.max_grad_norm", "1e-3",
                    "--model.init_args.generation_kwargs", json.dumps({"min_new_tokens": 6}),
                    "--model.init_args.optimizer", json.dumps({"class_path": "torch.optim.SGD",
                                                               "init_args": {"lr": 1.0}})))
    before, after = load_weights(sft_model_dir), load_weights(run_dir / "hf")
    update = torch.cat([(after[k] - before[k]).flatten() for k in before]).norm()
    assert 0.9e-3 < update <= 1.001e-3, update
    assert metric_series(read_metrics(run_dir), "train/response_length") == [6.0]  # EOS suppressed: all 6 tokens


def test_kl_coef_zero_starts_no_reference_worker(sft_model_dir):
    from rlhf_lightning.algorithms import PPO

    ppo = PPO(model=str(sft_model_dir), reward_functions=[EVEN], kl_coef=0.0, advantage_estimator="grpo",
              n_samples_per_prompt=2)
    assert ppo.hparams.kl_coef == 0
    rollout = Rollout(RolloutConfig(), str(sft_model_dir), None, [], {}, create=True)
    assert set(rollout.workers) == {"generation"}


# ------------------------------------------------------------------------------------------- reward functions
def test_reward_function_errors_name_the_function(tmp_path):
    fn = load_reward_fn(EVEN)
    assert checked_scores(fn, "even", ["p", "p"], ["12", "13"], [None, None]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 responses"):
        checked_scores(lambda p, r, lab: [1.0], "short", ["a", "b"], ["x", "y"], [None, None])
    with pytest.raises(ValueError, match="'nan' returned NaN/inf for 1 responses"):
        checked_scores(lambda p, r, lab: [1.0, float("nan")], "nan", ["a", "b"], ["x", "y"], [None, None])
    with pytest.raises(TypeError, match="'words' must return a list of numbers"):
        checked_scores(lambda p, r, lab: ["good", "bad"], "words", ["a", "b"], ["x", "y"], [None, None])
    with pytest.raises(ValueError, match="must look like"):
        load_reward_fn("no_colon")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_fn(str(tmp_path / "missing.py") + ":fn")
    with pytest.raises(AttributeError, match="no callable 'nope'"):
        load_reward_fn(f"{REPO}/examples/reward_fns.py:nope")


@pytest.fixture
def reward_server():
    """A real HTTP reward endpoint on 127.0.0.1: scores 1.0 for responses containing a digit; ``/broken`` answers
    malformed JSON and ``/missing`` a 404. Records how many requests it served."""
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            served.append(len(request["responses"]))
            if self.path == "/missing":
                self.send_error(404, "no such reward")
                return
            rewards = [float(any(c.isdigit() for c in r)) for r in request["responses"]]
            body = b"not json" if self.path == "/broken" else json.dumps({"rewards": rewards}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()


def test_remote_reward_over_http(tmp_path, sft_model_dir, reward_server):
    from rlhf_lightning.rollout.rewards import RemoteReward

    url, served = reward_server
    assert RemoteReward(url + "/score")(["p", "p"], ["12", "ab"], [None, None]) == [1.0, 0.0]
    with pytest.raises(RuntimeError, match="HTTP 404"):
        RemoteReward(url + "/missing", retries=3)(["p"], ["1"], [None])
    assert served == [2, 1]  # a 4xx is not retried
    with pytest.raises(RuntimeError, match="must answer JSON"):
        RemoteReward(url + "/broken")(["p"], ["1"], [None])
    closed = socket.create_server(("127.0.0.1", 0))
    closed_url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    closed.close()
    with pytest.raises(RuntimeError, match="failed after 2 attempts"):
        RemoteReward(closed_url, timeout=2, retries=1)(["p"], ["1"], [None])
    with pytest.raises(ValueError, match="must start with http"):
        RemoteReward("localhost:8000")

    # The same endpoint next to a rule reward in GRPO, through the CLI: each source is logged on its own.
    served.clear()
    run_dir = tmp_path / "remote"
    run_cli(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "2", "--model.init_args.remote_reward_url",
                    url + "/score", "--model.init_args.remote_reward_batch_size", "12"))
    assert sorted(served) == [8, 8, 12, 12, 12, 12]  # 8 prompts x 4 samples per step, in requests of at most 12
    rows = read_metrics(run_dir)
    total, even, remote = (metric_series(rows, f"train/reward{k}") for k in ("", "/even_answer", "/127.0.0.1"))
    assert len(total) == len(even) == len(remote) == 2
    for t, e, r in zip(total, even, remote, strict=True):
        assert t == pytest.approx(e + r, abs=1e-5)  # the weighted sum (weights 1)


def test_ppo_without_reward_or_with_bad_group_size_is_rejected():
    from rlhf_lightning.algorithms import PPO

    with pytest.raises(ValueError, match="PPO needs a reward"):
        PPO(model="tiny-llama")
    with pytest.raises(ValueError, match="n_samples_per_prompt >= 2"):
        PPO(model="tiny-llama", reward_functions=[EVEN], advantage_estimator="grpo", n_samples_per_prompt=1)


# -------------------------------------------------------------------------------------------------- rollout
def test_local_rollout_splits_prompts_keeps_order_and_syncs_weights(sft_model_dir, tiny_model_dir):
    prompts = [[1, 4, 949, 505, 226, 22 + i, 36, 2, 5] for i in range(5)]
    sampling = {"n": 2, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "eos_token_ids": [2],
                "pad_token_id": 0}
    one = Rollout(RolloutConfig(), str(sft_model_dir), None, [], {}, create=True)
    three = Rollout(RolloutConfig(generation=WorkerGroup(count=3)), str(sft_model_dir), None, [], {}, create=True)
    a, versions_one = one.generate(prompts, **sampling)
    b, versions_three = three.generate(prompts, **sampling)
    assert a == b and len(a) == 10 and versions_one == [0] and versions_three == [0, 0, 0]
    other = load_weights(tiny_model_dir)  # different weights: greedy outputs must change after the push
    one.push_weights(other, version=1)
    c, versions = one.generate(prompts, **sampling)
    assert versions == [1] and c != a


# ------------------------------------------------------------------------------------------------------ ray
def test_ray_rollout_actors_sync_weights(sft_model_dir, tiny_model_dir, monkeypatch):
    """Separate Ray actors: greedy outputs change once new weights are pushed, and the version is checked."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = RolloutConfig(backend="ray", namespace="test-sync", generation=WorkerGroup(count=2, num_cpus=0.5),
                           reference=WorkerGroup(num_cpus=0.5))
    rollout = Rollout(config, str(sft_model_dir), str(sft_model_dir), [], {}, create=True)
    try:
        assert ray.get_actor("test-sync-generation-1", namespace="test-sync") is not None
        prompts = [[1, 4, 949, 505, 226, 22 + i, 36, 2, 5] for i in range(3)]
        sampling = {"n": 2, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "eos_token_ids": [2],
                    "pad_token_id": 0}
        before, versions = rollout.generate(prompts, **sampling)
        assert versions == [0, 0] and len(before) == 6
        rollout.push_weights(load_weights(tiny_model_dir), version=1)
        after, versions = rollout.generate(prompts, **sampling)
        assert versions == [1, 1] and after != before
        ids = torch.tensor([prompts[0] + before[0]])
        labels = torch.tensor([[-100] * len(prompts[0]) + before[0]])
        handles = rollout.score_async(ids, torch.ones_like(ids), labels, normalize_rewards=True)
        (ref_logps,) = rollout.wait(list(handles.values()))
        assert ref_logps.shape == ids.shape and (ref_logps <= 0).all()
    finally:
        rollout.shutdown()
        ray.shutdown()


def test_grpo_two_ranks_on_ray(tmp_path, sft_model_dir):
    """Two trainer ranks (ZeRO-2 with the optimizer offloaded to CPU Adam) share Ray generation/reference actors;
    each rank gets different prompts."""
    from conftest import run_cli_subprocess

    run_dir = tmp_path / "grpo-ray"
    run_cli_subprocess(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "10", "--trainer.devices", "2",
                               "--trainer.strategy.init_args.offload_optimizer", "true",
                               "--data.init_args.batch_size", "4", "--model.init_args.micro_batch_size", "16",
                               "--model.init_args.rollout.backend", "ray",
                               "--model.init_args.rollout.namespace", "test-grpo-ray",
                               "--model.init_args.rollout.generation.num_cpus", "0.5",
                               "--model.init_args.rollout.reference.num_cpus", "0.5"))
    assert_reward_rises(run_dir, sft_model_dir)

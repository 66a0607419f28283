"""The rollout layer's structure: backends behind one interface, a typed experience, no import of algorithms."""

import ast
import re

import pytest
import torch
from conftest import REPO

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.backends import LocalBackend, RayBackend, make_backend
from rlhf_lightning.rollout.config import RolloutConfig
from rlhf_lightning.rollout.experience import Experience

ROLLOUT = REPO / "rlhf_lightning" / "rollout"


class Counter:
    def __init__(self, path: str, start: int = 0) -> None:
        self.path, self.value = path, start

    def ready(self) -> bool:
        return True

    def add(self, amount: int) -> int:
        self.value += amount
        return self.value


def test_backends_by_name_and_the_local_one_calls_in_process():
    assert type(make_backend(RolloutConfig())) is LocalBackend
    assert type(make_backend(RolloutConfig(backend="ray"))) is RayBackend
    assert LocalBackend.in_process and not RayBackend.in_process
    backend = make_backend(RolloutConfig())
    worker = backend.make("counter", 0, Counter, "unused", RolloutConfig().generation, {"start": 5}, create=True)
    backend.wait_started([worker], created=True)
    assert backend.wait([backend.call(worker, "add", 1), backend.call(worker, "add", 2)]) == [6, 8]
    state = {"w": torch.ones(2)}
    assert backend.share(state) is state  # in process: nothing copied


def test_share_policy_with_ray_is_refused_when_the_config_is_built():
    with pytest.raises(ConfigError, match="share_policy: true needs model.init_args.rollout.backend: local"):
        RolloutConfig(backend="ray", share_policy=True)
    RolloutConfig(backend="ray", share_policy=False)
    with pytest.raises(ConfigError, match=r"rollout.weight_sync_bucket_mb must be > 0 \(got 0\)"):
        RolloutConfig(weight_sync_bucket_mb=0)


def test_rollout_code_imports_no_algorithm_and_checks_no_backend_by_name():
    """``rollout/`` depends on models, log-probs and strategies only; which backend runs is decided in one table
    (``make_backend``), not by comparing ``backend`` strings around the code."""
    for path in ROLLOUT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("rlhf_lightning.algorithms"), f"{path.name} imports {node.module}"
    sources = [p for p in ROLLOUT.glob("*.py") if p.name != "config.py"] + [  # config.py validates the option itself
               REPO / "rlhf_lightning/algorithms/ppo.py",
               REPO / "rlhf_lightning/algorithms/ppo_rollout.py", REPO / "rlhf_lightning/cli.py"]
    for path in sources:
        assert not re.search(r"backend\s*[!=]=\s*['\"]", path.read_text()), f"{path.name} checks a backend by name"


def test_experience_slices_its_sequences():
    ids = torch.arange(12).view(3, 4)
    exp = Experience(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, mask=torch.ones(3, 3),
                     scores=torch.zeros(3), source_scores=torch.zeros(1, 3), kl=torch.zeros(3, 3),
                     advantages=torch.zeros(3, 3))
    assert len(exp) == 3 and exp.old_logps is None
    assert torch.equal(exp.sequences(slice(1, 3))["input_ids"], ids[1:3])

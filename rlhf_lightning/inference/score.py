"""Batch scoring: reward models and/or reward functions score a jsonl file, through Lightning's ``predict`` loop.

    python -m rlhf_lightning predict --config configs/tiny/score.yaml

Rows come from :class:`~rlhf_lightning.data.scoring.ScoringDataModule` (prompt/response, prompt/responses as batch
generation writes them, or prompt/chosen/rejected pairs). Every source scores every response the way PPO's
rollouts do, through the same code: a reward model through
:meth:`~rlhf_lightning.rollout.workers.RewardModelWorker.score` (normalised with the mean/std stored at export
unless ``normalize_reward: false``) on ``encode_prompt_response`` tokens; a reward function through
:func:`~rlhf_lightning.rollout.rewards.checked_scores`; several sources are combined by
:func:`~rlhf_lightning.rollout.rewards.combine_rewards` (``reward_weights``, ``reward_clip``).

Output: the input rows with ``score`` / ``scores`` / ``chosen_score`` + ``rejected_score`` added (and
``source_scores`` per source when there are several), plus ``<output>.summary.json`` (:func:`summarize`,
:func:`pair_summary`), also printed. Scoring is not resumed: each run starts over.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from rlhf_lightning.algorithms.base import RLHFModule, model_option, option_errors, require
from rlhf_lightning.data.collate import pad_sequences
from rlhf_lightning.data.formatting import encode_prompt_response
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.inference.writer import report
from rlhf_lightning.models import check_model_path, has_score_head, load_tokenizer
from rlhf_lightning.rollout.rewards import checked_scores, combine_rewards, load_reward_fn, source_names
from rlhf_lightning.rollout.workers import RewardModelWorker

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default, "type 7" of Hyndman & Fan 1996)."""
    position = q * (len(sorted_values) - 1)
    low, frac = int(math.floor(position)), position - math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + frac * (sorted_values[high] - sorted_values[low])


def summarize(values: list[float]) -> dict[str, float]:
    """count, mean, population std, min, max and the 5/25/50/75/95% quantiles of ``values``."""
    if not values:
        return {"count": 0}
    ordered, n = sorted(values), len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"count": n, "mean": mean, "std": std, "min": ordered[0], "max": ordered[-1],
            **{f"p{round(q * 100)}": quantile(ordered, q) for q in QUANTILES}}


def pair_summary(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Preference accuracy (share of pairs with ``chosen > rejected``; a tie counts half) and mean margin
    ``chosen - rejected``, as a Bradley-Terry reward model is evaluated (Ouyang et al. 2022, sec. 3.5)."""
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"pairs": len(margins), "accuracy": wins / max(len(margins), 1),
            "mean_margin": sum(margins) / max(len(margins), 1)}


def rule_prompt(prompt: str | list[dict[str, Any]]) -> str:
    """The prompt text a reward function sees: the text itself, or the last message's content of a chat."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))


class Scorer(RLHFModule):
    """Scores responses with reward models and/or reward functions (``predict`` only).

    Args:
        reward_models: reward-model directories (exports of ``RewardModel``: a score head is required).
        reward_functions: ``file.py:fn`` or ``module:fn`` rules, ``(prompts, responses, labels) -> floats``.
        reward_weights: one weight per source, in the order models then functions (default all 1).
        reward_clip: clip the combined score to [-c, c] (``None`` = no clipping).
        normalize_reward: standardise reward-model scores with the mean/std stored in the model (as PPO).
        input_template: ``"...{}..."`` prompt format for the reward models instead of their chat template.
        use_chat_template: render prompt and response with the reward model tokenizer's chat template.
        micro_batch_size: sequences per reward-model forward pass.
        kwargs: ``dtype``, ``attn_implementation``, ``trust_remote_code`` of :class:`RLHFModule` (``model`` unused).
    """

    resumable = False

    def __init__(self, *args: Any, reward_models: list[str] | None = None, reward_functions: list[str] | None = None,
                 reward_weights: list[float] | None = None, reward_clip: float | None = None,
                 normalize_reward: bool = True, input_template: str | None = None, use_chat_template: bool = True,
                 micro_batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sources = len(reward_models or []) + len(reward_functions or [])
        if sources == 0:
            raise ConfigError("Scoring needs a reward: set model.init_args.reward_models and/or "
                              "model.init_args.reward_functions.")
        if reward_weights is not None and len(reward_weights) != sources:
            raise ConfigError(f"model.init_args.reward_weights has {len(reward_weights)} entries for {sources} reward "
                              f"sources: give one weight per source, in the order reward_models, reward_functions.")
        require(reward_clip is None or reward_clip > 0, "reward_clip", reward_clip, "> 0, or null")
        require(micro_batch_size >= 1, "micro_batch_size", micro_batch_size, ">= 1")
        self.names = source_names(reward_models or [], reward_functions or [], None)
        self.workers: list[tuple[Any, RewardModelWorker]] = []
        self.functions: list[tuple[str, Any]] = []

    def check_config(self, datamodule: LightningDataModule | None) -> None:
        """Reward-model paths exist and have a score head (checked from config/weight names, before loading);
        reward functions import."""
        for i, path in enumerate(self.hparams.reward_models or []):
            option = f"{model_option('reward_models')}[{i}]"
            check_model_path(path, option)
            if has_score_head(path) is False:
                raise ConfigError(f"{option}='{path}' has no score head: it is a causal LM (e.g. an SFT export), not a "
                                  f"reward model. Point {option} at the export of a RewardModel run (configs/tiny/"
                                  f"rm.yaml), or score with model.init_args.reward_functions.")
        with option_errors(model_option("reward_functions"), OSError, ImportError, AttributeError, ValueError):
            self.functions = [(spec, load_reward_fn(spec)) for spec in self.hparams.reward_functions or []]

    def configure_model(self) -> None:
        if self.workers:
            return
        hp = self.hparams
        device = str(self.trainer.strategy.root_device) if self._has_trainer else None
        for path in hp.reward_models or []:
            worker = RewardModelWorker(path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
                                       trust_remote_code=hp.trust_remote_code, device=device)
            self.workers.append((load_tokenizer(path, trust_remote_code=hp.trust_remote_code), worker))
        self.reward_models = torch.nn.ModuleList([w.model for _, w in self.workers])  # for the model summary
        if not self.functions:
            self.functions = [(spec, load_reward_fn(spec)) for spec in hp.reward_functions or []]

    def configure_optimizers(self) -> None:
        return None

    def output_meta(self) -> dict[str, Any]:
        hp = self.hparams
        return {"reward_models": hp.reward_models or [], "reward_functions": hp.reward_functions or [],
                "reward_weights": hp.reward_weights, "reward_clip": hp.reward_clip,
                "normalize_reward": hp.normalize_reward, "data": self.trainer.datamodule.hparams.path,
                "layout": self.trainer.datamodule.layout}

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def reward_model_scores(self, tokenizer: Any, worker: RewardModelWorker, prompts: list[Any],
                            responses: list[str]) -> torch.Tensor:
        """Scores of one reward model, tokenized as in PPO's rollouts (prompt + response, right-padded)."""
        hp, scores = self.hparams, []
        for start in range(0, len(responses), hp.micro_batch_size):
            sequences = [sum(encode_prompt_response(tokenizer, p, r, hp.input_template, hp.use_chat_template), [])
                         for p, r in zip(prompts[start:start + hp.micro_batch_size],
                                         responses[start:start + hp.micro_batch_size], strict=True)]
            input_ids = pad_sequences(sequences, tokenizer.pad_token_id)
            attention_mask = pad_sequences([[1] * len(s) for s in sequences], 0)
            scores.append(worker.score(input_ids, attention_mask, normalize=hp.normalize_reward).float())
        return torch.cat(scores)

    def score(self, prompts: list[Any], responses: list[str], labels: list[str | None]) -> torch.Tensor:
        """(sources + 1, N): each source's scores, then the combined score, of ``N`` prompt/response pairs."""
        sources = [self.reward_model_scores(tok, worker, prompts, responses) for tok, worker in self.workers]
        texts = [rule_prompt(p) for p in prompts]
        sources += [torch.tensor(checked_scores(fn, spec, texts, responses, labels)) for spec, fn in self.functions]
        stacked = torch.stack(sources)
        return torch.cat([stacked, combine_rewards(stacked, self.hparams.reward_weights,
                                                   self.hparams.reward_clip)[None]])

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[tuple[int, dict[str, Any]]]:
        data = self.trainer.datamodule
        hp = data.hparams
        keys = {"response": [hp.response_key], "pairs": [hp.chosen_key, hp.rejected_key]}.get(data.layout)
        prompts, responses, labels, owner = [], [], [], []
        for i, item in enumerate(batch):
            row = item["row"]
            texts = row[hp.responses_key] if keys is None else [row[k] for k in keys]
            label = row.get(hp.label_key) if hp.label_key else None
            for text in texts:
                prompts.append(row[hp.prompt_key])
                responses.append(text)
                labels.append(None if label is None else str(label))
                owner.append(i)
        table = self.score(prompts, responses, labels).tolist() if responses else [[]] * (len(self.names) + 1)
        out = []
        for i, item in enumerate(batch):
            cols = [j for j, o in enumerate(owner) if o == i]
            combined = [table[-1][j] for j in cols]
            row = dict(item["row"])
            if data.layout == "response":
                row["score"] = combined[0]
            elif data.layout == "pairs":
                row["chosen_score"], row["rejected_score"] = combined
            else:
                row["scores"] = combined
            if len(self.names) > 1:
                per = {name: [table[s][j] for j in cols] for s, name in enumerate(self.names)}
                row["source_scores"] = {k: v[0] if data.layout == "response" else v for k, v in per.items()}
            out.append((item["index"], row))
        return out

    def summarize(self, output: Path) -> dict[str, Any]:
        """Summary statistics of a written output (rank 0, after the merge): written and printed."""
        rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
        layout = self.trainer.datamodule.layout
        summary: dict[str, Any] = {"output": str(output), "layout": layout, "rows": len(rows),
                                   "sources": self.names}
        if layout == "pairs":
            chosen, rejected = [r["chosen_score"] for r in rows], [r["rejected_score"] for r in rows]
            summary |= pair_summary(chosen, rejected) | {"chosen": summarize(chosen), "rejected": summarize(rejected)}
            values = chosen + rejected
        else:
            values = [r["score"] for r in rows] if layout == "response" else [s for r in rows for s in r["scores"]]
        summary["score"] = summarize(values)
        if len(self.names) > 1 and layout != "pairs":
            flat = (lambda v: v if isinstance(v, list) else [v])  # noqa: E731
            summary["per_source"] = {name: summarize([s for r in rows for s in flat(r["source_scores"][name])])
                                     for name in self.names}
        path = output.with_name(output.name + ".summary.json")
        path.write_text(json.dumps(summary, indent=2) + "\n")
        report(f"Score summary ({path}):\n{json.dumps(summary, indent=2)}")
        return summary

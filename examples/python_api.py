"""The Python API instead of the CLI: a custom DPO variant, then GRPO with a custom reward, with a custom callback.

    python examples/python_api.py --model runs/tiny-sft/hf    # after configs/tiny/sft.yaml (or scripts/demo.sh)

Everything the YAML configs do is plain Python: build a LightningModule and a LightningDataModule, hand them to a
``lightning.Trainer`` with the DeepSpeed strategy. This script runs, on the demo task's data:

1. ``ExponentialDPO`` (``custom_dpo_loss.py``: one overridden method) on the preference pairs;
2. GRPO from the DPO model with ``reward_fns.py:reversal_prefix``, a partial-credit reward written for the demo task;

with ``GenerationSamples`` (``generation_samples.py``) printing greedy answers as they train, and prints the
held-out accuracy before and after. Outputs go to ``--out`` (default ``runs/python-api``).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

from custom_dpo_loss import ExponentialDPO  # noqa: E402
from generation_samples import GenerationSamples  # noqa: E402

from rlhf_lightning.algorithms import PPO  # noqa: E402
from rlhf_lightning.callbacks import HFExport  # noqa: E402
from rlhf_lightning.data import PreferenceDataModule, PromptDataModule  # noqa: E402
from rlhf_lightning.strategies import DeepSpeedStrategy  # noqa: E402
from rlhf_lightning.tasks.reverse import evaluate  # noqa: E402

DATA = EXAMPLES / "data" / "reverse"
WATCHED = ["reverse: a b c d e f", "reverse: q w e r t y u i"]


def trainer(out: Path, max_steps: int, *callbacks: object, overwrite: bool = False) -> Trainer:
    """One process, DeepSpeed ZeRO-2 (on CPU or GPU), CSV logs and a Hugging Face export in ``out`` (an earlier
    export there is an error unless ``overwrite``)."""
    return Trainer(accelerator="auto", devices=1, strategy=DeepSpeedStrategy(stage=2), max_steps=max_steps,
                   max_epochs=-1, default_root_dir=str(out), logger=CSVLogger(str(out), name="csv"),
                   enable_checkpointing=False, log_every_n_steps=1,
                   callbacks=[HFExport(dirpath=str(out / "hf"), overwrite=overwrite), *callbacks])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/tiny-sft/hf", help="an SFT export (or any causal LM)")
    parser.add_argument("--out", type=Path, default=Path("runs/python-api"))
    parser.add_argument("--overwrite", action="store_true", help="replace the exports of an earlier run in --out")
    parser.add_argument("--dpo-steps", type=int, default=200)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--max-pairs", type=int, default=None, help="use only the first N preference pairs")
    args = parser.parse_args(argv)
    seed_everything(42)
    results = {"start": evaluate(args.model, DATA / "heldout.jsonl")}

    dpo_dir = args.out / "dpo"
    dpo = ExponentialDPO(model=args.model, beta=0.5, precompute_reference=True,
                         optimizer=partial(torch.optim.AdamW, lr=5e-4, weight_decay=0.0), lr_scheduler="constant",
                         warmup_steps=0)
    pairs = PreferenceDataModule(path=str(DATA / "preference.jsonl"), tokenizer=args.model, val_split=0.05,
                                 max_len=128, batch_size=16, max_samples=args.max_pairs)
    trainer(dpo_dir, args.dpo_steps, GenerationSamples(WATCHED, every_n_steps=50), overwrite=args.overwrite).fit(
        dpo, datamodule=pairs)
    results["dpo"] = evaluate(dpo_dir / "hf", DATA / "heldout.jsonl")

    grpo_dir = args.out / "grpo"
    grpo = PPO(model=str(dpo_dir / "hf"), advantage_estimator="grpo", n_samples_per_prompt=8, max_new_tokens=12,
               temperature=0.7, reward_functions=[f"{EXAMPLES / 'reward_fns.py'}:reversal_prefix"], kl_coef=0.01,
               kl_estimator="k3", kl_in_reward=False, micro_batch_size=64, loss_aggregation="seq_mean_token_mean",
               optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0), lr_scheduler="constant",
               warmup_steps=0)
    prompts = PromptDataModule(path=str(DATA / "prompts.jsonl"), tokenizer=str(dpo_dir / "hf"), label_key="answer",
                               batch_size=32)
    trainer(grpo_dir, args.grpo_steps, GenerationSamples(WATCHED, every_n_steps=20), overwrite=args.overwrite).fit(
        grpo, datamodule=prompts)
    results["grpo"] = evaluate(grpo_dir / "hf", DATA / "heldout.jsonl")

    for stage, r in results.items():
        print(f"{stage:6s} held-out exact match {r['accuracy']:.1%}, letter accuracy {r['letter_accuracy']:.1%}")
    return results


if __name__ == "__main__":
    main()

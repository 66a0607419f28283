"""Entry point: ``python -m rlhf_lightning fit --config configs/tiny/sft.yaml`` (or the ``rlhf-lightning`` script)."""

from __future__ import annotations

import torch

from rlhf_lightning.cli import RLHFCLI


def main(args: list[str] | None = None) -> RLHFCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` so tests can call it in-process."""
    try:
        return RLHFCLI(args=args)
    finally:
        # ZeRO-3 on several CPU ranks can abort at interpreter exit unless the process group is torn down first.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""Entry point: ``python -m rlhf_lightning fit --config configs/tiny/sft.yaml`` (or the ``rlhf-lightning`` script)."""

from __future__ import annotations

from rlhf_lightning.cli import RLHFCLI
from rlhf_lightning.strategies import destroy_distributed


def main(args: list[str] | None = None) -> RLHFCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` so tests can call it in-process."""
    try:
        return RLHFCLI(args=args)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()

"""hardneg-miner: offline hard-negative mining. `from miner import mine_hard_negatives` is the drop-in for
sentence-transformers' function of that name (miner/dropin.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from miner.dropin import mine_hard_negatives

__all__ = ["mine_hard_negatives"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import miner` (the CLI, every worker) stays free of the pipeline's heavy imports.
    if name == "mine_hard_negatives":
        from miner.dropin import mine_hard_negatives

        return mine_hard_negatives
    raise AttributeError(f"module 'miner' has no attribute {name!r}")

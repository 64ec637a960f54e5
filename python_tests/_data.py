"""Small training data the trainer tests write."""

from __future__ import annotations

import json


def write_instructions(path, repeat: int = 4) -> str:
    """An Alpaca-style jsonl of four one-word instructions ("Say yes." -> "yes", ...), each `repeat` times;
    returns its path as a string."""
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe", "never")] * repeat
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)

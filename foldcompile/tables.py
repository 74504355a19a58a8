r"""Plain-text table helpers shared by ``explain``, ``profile``, the CLI and the HTML report:
module paths cut to a depth, per-class entries, aligned tables.

    >>> rows = [[cut_path("blocks.0.mha", 1), 3], [cut_path("", 1), 2]]
    >>> print("\n".join(format_table(["module", "nodes"], rows)))
    module  nodes
    ------  -----
    blocks      3
    (root)      2
    >>> human(2.5e12, "FLOP"), human(3.1e8, "B"), human(0.0042, "s"), human(0, "B")
    ('2.5 TFLOP', '310 MB', '4.2 ms', '0 B')
"""
from __future__ import annotations

from typing import Any

__all__ = ["ROOT", "cut_path", "entry", "format_table", "human"]

ROOT = "(root)"  # how nodes of the model's own forward (module path "") are shown


def cut_path(path: str, depth: int | None) -> str:
    """A module path cut to its first ``depth`` components; the root is shown as ``(root)``."""
    if not path:
        return ROOT
    return path if depth is None else ".".join(path.split(".")[:depth])


def entry(count: int, flops: int, nbytes: int) -> dict[str, Any]:
    return {"count": count, "flops": flops, "bytes": nbytes, "intensity": (flops / nbytes) if nbytes else 0.0}


def format_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Aligned plain-text table lines; floats with 4 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if v else "0"
        return str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for r in cells:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return out


_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ"))


def human(value: float, unit: str) -> str:
    """``value`` with an SI prefix and 3 significant digits (``2.5 TFLOP``, ``310 MB``, ``4.2 ms``)."""
    if value == 0:
        return f"0 {unit}"
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale * 0.9995:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"

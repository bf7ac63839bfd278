"""A stage's step time on a calibrated CPU: the measured cost of one of the model's own decoder layers at the
step's rows and contexts, times the stage's layers, plus the measured LM head and sampler on the last stage
(calibrate_ops.py measures them; docs/planning.md, "Calibrated CPU steps", has the equation)."""

from __future__ import annotations

from dataclasses import dataclass


def shape_key(hidden: int, intermediate: int, q_heads: int, kv_heads: int, head_dim: int, vocab_rows: int,
              dtype: str) -> str:
    """Names one TP rank's shape: calibrated costs apply to any model whose rank has these numbers."""
    return f"h{hidden}-i{intermediate}-q{q_heads}-kv{kv_heads}-d{head_dim}-v{vocab_rows}-{dtype}"


@dataclass(frozen=True)
class LayerCosts:
    """One rank shape's calibrated costs (seconds), as calibrate_ops.measure_layer_costs stores them."""

    base: tuple[tuple[float, float], ...]  # (rows, one layer's seconds without attention to earlier context)
    attn_s_per_row_ctx: float  # a decode row's attention, per context token
    prefill_s_per_row_ctx: float  # a prompt chunk row's attention, per earlier token of its prompt
    head: tuple[tuple[float, float], ...]  # (rows, final norm + LM head + argmax seconds)

    @staticmethod
    def from_dict(d: dict) -> LayerCosts:
        return LayerCosts(tuple((float(r), float(t)) for r, t in d["base"]), float(d["attn_s_per_row_ctx"]),
                          float(d["prefill_s_per_row_ctx"]), tuple((float(r), float(t)) for r, t in d["head"]))

    def layer(self, decode_rows: float, ctx: float, prefill_rows: float, prefill_start: float) -> float:
        """One layer: decodes at context `ctx` and one prompt chunk after `prefill_start` earlier tokens."""
        rows = decode_rows + prefill_rows
        return (interpolate(self.base, rows) + self.attn_s_per_row_ctx * decode_rows * ctx
                + self.prefill_s_per_row_ctx * prefill_rows * prefill_start)

    def tail(self, sampled: float) -> float:
        return interpolate(self.head, sampled) if sampled > 0 else 0.0


def interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Linear between measured points; below the first, its value; beyond the last, proportional to x (rows past
    the largest measured chunk cost what its rows cost)."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] * x / points[-1][0]

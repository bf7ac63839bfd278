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
    # (rows, slowdown with every core running a layer at once: calibrate_corun.py); empty where not measured
    corun: tuple[tuple[float, float], ...] = ()

    @staticmethod
    def from_dict(d: dict) -> LayerCosts:
        return LayerCosts(tuple((float(r), float(t)) for r, t in d["base"]), float(d["attn_s_per_row_ctx"]),
                          float(d["prefill_s_per_row_ctx"]), tuple((float(r), float(t)) for r, t in d["head"]),
                          tuple((float(r), float(f)) for r, f in d.get("corun", ())))

    def layer(self, decode_rows: float, ctx: float, prefill_rows: float, prefill_start: float,
              corunning: bool = False) -> float:
        """One layer: decodes at context `ctx` and one prompt chunk after `prefill_start` earlier tokens; with
        `corunning`, as it runs while the layout's other ranks keep the machine's other cores busy."""
        rows = decode_rows + prefill_rows
        alone = (interpolate(self.base, rows) + self.attn_s_per_row_ctx * decode_rows * ctx
                 + self.prefill_s_per_row_ctx * prefill_rows * prefill_start)
        return alone * self.slowdown(rows) if corunning else alone

    def tail(self, sampled: float, corunning: bool = False) -> float:
        if sampled <= 0:
            return 0.0
        return interpolate(self.head, sampled) * (self.slowdown(sampled) if corunning else 1.0)

    def slowdown(self, rows: float) -> float:
        """The co-running factor at `rows`: linear between measured row counts, the nearest one outside them."""
        if not self.corun:
            return 1.0
        if rows >= self.corun[-1][0]:
            return self.corun[-1][1]
        return interpolate(self.corun, rows)


def interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Linear between measured points; below the first, its value; beyond the last, proportional to x (rows past
    the largest measured chunk cost what its rows cost)."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] * x / points[-1][0]

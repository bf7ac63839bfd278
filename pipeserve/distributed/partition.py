"""How many decoder layers each pipeline stage gets.

The default balances estimated cost, not layer counts: the LM head (2*hidden*vocab FLOPs per sampled
token) can cost as much as several layers, so an even split leaves the last stage the bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeserve.config import ModelConfig
from pipeserve.distributed.stage import StageInfo

# The reference serving mix: 1024-token prompts, 128 generated tokens. Every computed token passes through
# the layers, but only the 128 sampled ones through the LM head: 128 / (1024 + 128) = 1/9.
REFERENCE_SAMPLED_FRACTION = 1 / 9


@dataclass(frozen=True)
class StageCosts:
    """Relative cost per token of the pieces a stage can hold (FLOPs of the matmuls)."""

    layer: float
    head: float
    embedding: float

    @staticmethod
    def of(cfg: ModelConfig, sampled_fraction: float = REFERENCE_SAMPLED_FRACTION) -> StageCosts:
        """Costs per computed token. The head runs only for sampled tokens: `sampled_fraction` of them."""
        h, hd = cfg.hidden_size, cfg.head_dim
        attn = h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, o, k, v
        mlp = 3 * h * cfg.intermediate_size
        head = 2.0 * h * cfg.vocab_size * sampled_fraction
        return StageCosts(layer=2.0 * (attn + mlp), head=head, embedding=0.0)

    def stage_cost(self, num_layers: int, first: bool, last: bool) -> float:
        return num_layers * self.layer + (self.embedding if first else 0.0) + (self.head if last else 0.0)


def even_partition(num_layers: int, num_stages: int) -> list[int]:
    """vLLM's rule: an equal share each; the remainder goes one by one to the stages before the last,
    walking towards the first (the last stage already carries the head)."""
    sizes = [num_layers // num_stages] * num_stages
    for i in range(2, num_layers % num_stages + 2):
        sizes[-i] += 1
    return sizes


def balanced_partition(num_layers: int, num_stages: int, costs: StageCosts) -> list[int]:
    """Contiguous split minimizing the most expensive stage (every stage gets at least one layer)."""
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def solve(start: int, stage: int) -> tuple[float, list[int]]:
        # The cheapest max-cost split of layers [start, num_layers) over stages [stage, num_stages).
        if (start, stage) in best:
            return best[(start, stage)]
        last = stage == num_stages - 1
        if last:
            result = (costs.stage_cost(num_layers - start, stage == 0, True), [num_layers - start])
        else:
            result = (float("inf"), [])
            for n in range(1, num_layers - start - (num_stages - stage - 1) + 1):
                rest_cost, rest = solve(start + n, stage + 1)
                cost = max(costs.stage_cost(n, stage == 0, False), rest_cost)
                if cost < result[0]:
                    result = (cost, [n, *rest])
        best[(start, stage)] = result
        return result

    return solve(0, 0)[1]


def parse_partition(spec: str | None, cfg: ModelConfig, num_stages: int) -> list[int]:
    """Layers per stage from a spec:

    * `balanced` (default): minimize the slowest stage for the reference mix (1/9 of tokens sampled);
    * `balanced:F`: the same for a mix where a fraction F of computed tokens is sampled (1 = all decode);
    * `even`: vLLM's equal split; or explicit counts like `19,11` that sum to the layer count.
    """
    n = cfg.num_hidden_layers
    if num_stages > n:
        raise ValueError(f"pipeline_parallel_size={num_stages} exceeds the model's {n} layers")
    if spec in (None, "") or spec.startswith("balanced"):
        return balanced_partition(n, num_stages, StageCosts.of(cfg, _sampled_fraction(spec)))
    if spec == "even":
        return even_partition(n, num_stages)
    try:
        sizes = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"pp_layer_partition {spec!r} is not 'balanced', 'even' or comma-separated counts") from None
    if len(sizes) != num_stages or sum(sizes) != n or min(sizes) < 1:
        raise ValueError(f"pp_layer_partition {spec!r} must give {num_stages} positive layer counts summing to {n}")
    return sizes


def _sampled_fraction(spec: str | None) -> float:
    if not spec or spec == "balanced":
        return REFERENCE_SAMPLED_FRACTION
    try:
        fraction = float(spec.removeprefix("balanced:"))
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"pp_layer_partition {spec!r}: expected balanced:F with F in [0, 1]")
    return fraction


def stages_from_sizes(sizes: list[int]) -> list[StageInfo]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [StageInfo(i, len(sizes), s, s + n) for i, (s, n) in enumerate(zip(starts, sizes, strict=True))]


def describe(sizes: list[int], costs: StageCosts) -> str:
    """One log line: layers and estimated relative cost per stage, and the balance (slowest / mean)."""
    stage_costs = [costs.stage_cost(n, i == 0, i == len(sizes) - 1) for i, n in enumerate(sizes)]
    mean = sum(stage_costs) / len(stage_costs)
    parts = ", ".join(f"stage {i}: {n} layers (cost {c / costs.layer:.1f} layer-eq)"
                      for i, (n, c) in enumerate(zip(sizes, stage_costs, strict=True)))
    return f"{parts}; slowest/mean = {max(stage_costs) / mean:.3f}"

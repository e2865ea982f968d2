"""Which decoder layers each pipeline stage holds: one function, shared by the launcher (which checks a
--pp-layer-partition against the model before anything starts) and the workers (which build their stage)."""

from __future__ import annotations

from headrace.common.config import ConfigError


def stage_layer_ranges(num_layers: int, pp_size: int, counts: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) of every stage's layers, first stage first.

    Without `counts` the split is even; the layers left over go one each to the stages just before the last,
    never to the last one, which also runs the final norm, the LM head and the sampler (vLLM's default,
    `get_pp_indices`). The first stage's embedding is a lookup, cheap beside a layer, so it gets no discount.
    """
    if pp_size > num_layers:
        raise ConfigError(f"--pipeline-parallel-size {pp_size} exceeds the model's {num_layers} layers")
    if counts:
        if sum(counts) != num_layers:
            raise ConfigError(f"--pp-layer-partition {','.join(map(str, counts))} covers {sum(counts)} layers; "
                              f"the model has {num_layers}")
    else:
        counts = [num_layers // pp_size] * pp_size
        for i in range(num_layers % pp_size):
            counts[-2 - i] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges

"""Pipeline stages' layer ranges and the pipeline / multi-node settings' validation."""

from __future__ import annotations

import pytest

from headrace.common.config import ConfigError, ParallelConfig
from headrace.common.pipeline_layout import stage_layer_ranges


def test_even_split_gives_the_remainder_to_the_stages_before_the_last():
    assert stage_layer_ranges(30, 2) == [(0, 15), (15, 30)]
    assert stage_layer_ranges(30, 4) == [(0, 7), (7, 15), (15, 23), (23, 30)]  # 7, 8, 8, 7
    assert stage_layer_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]  # 3, 4, 3
    assert stage_layer_ranges(5, 1) == [(0, 5)]


def test_explicit_partition_is_used_and_must_cover_every_layer():
    counts = ParallelConfig(pipeline_parallel_size=3, pp_layer_partition="4,4,2").layer_partition_counts
    assert stage_layer_ranges(10, 3, counts) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ConfigError, match="covers 9 layers; the model has 10"):
        stage_layer_ranges(10, 3, [4, 3, 2])
    with pytest.raises(ConfigError, match="exceeds the model's 2 layers"):
        stage_layer_ranges(2, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"pipeline_parallel_size": 0}, "--pipeline-parallel-size must be >= 1"),
    ({"pipeline_parallel_size": 2, "pp_layer_partition": "3,3,3"}, "names 3 stages"),
    ({"pipeline_parallel_size": 2, "pp_layer_partition": "3,x"}, "comma-separated layer counts"),
    ({"pipeline_parallel_size": 2, "pp_layer_partition": "3,0"}, "at least one layer"),
    ({"nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, "--node-rank must be in 0..1"),
    ({"nnodes": 2, "pipeline_parallel_size": 3, "dist_init_addr": "h:1"}, "do not split evenly"),
    ({"nnodes": 2, "pipeline_parallel_size": 2}, "needs --dist-init-addr"),
    ({"headless": True, "nnodes": 2, "pipeline_parallel_size": 2, "dist_init_addr": "h:1"}, "--node-rank >= 1"),
])
def test_bad_parallel_settings_are_refused_with_the_flag_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**kwargs)


def test_nodes_run_contiguous_equal_blocks_of_the_world():
    par = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, nnodes=2, node_rank=1,
                         dist_init_addr="h:1", headless=True)
    assert par.world_size == 4 and par.node_ranks == range(2, 4)

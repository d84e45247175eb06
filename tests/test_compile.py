"""--compile: the transformer blocks compiled by inductor (on the CPU here) train as eager ones do, across the
store's bucket shapes, with a bounded number of compiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import cogtrain, losses

STEPS = 9
"""Three epochs of the trainer store: batches of 1 at 17x32x32, 2 at 17x32x48 and 1 at 17x48x32, three times."""
LOSS_RTOL = 1e-4
"""Inductor fuses the float32 ops and may order the sums in them otherwise than eager: each result can differ in
its last bits (relative 1e-7), and nine steps of updates carry that forward, far below 1e-4."""


@pytest.fixture(scope="module")
def eager(train_store, tiny_models, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eager") / "run"
    cogtrain(train_store, tiny_models["5b"], run, "--max-steps", STEPS)
    return run


@pytest.mark.slow
# Shapes are dynamic, but dynamo still compiles a batch of one apart from larger ones, and the first block apart
# from the rest (its input needs no gradient: the patch embedding is frozen): 2 x 2, whatever the number of steps
# and bucket shapes. With the offload, the recompute hands the first block a copy of its input where the forward
# pass gave it a slice sharing memory with the text tokens: one more per batch size, 2 x 3.
@pytest.mark.parametrize(("options", "max_compiles"), [((), 4), (("--offload-checkpoints",), 6)],
                         ids=["checkpointing", "offload"])
def test_compiled_blocks_train_as_eager_with_a_bounded_number_of_compiles(train_store, tiny_models, eager, tmp_path,
                                                                        options, max_compiles):
    run = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], run, "--max-steps", STEPS, "--compile", *options)

    compiled, reference = losses(run), losses(eager)
    assert sorted(compiled) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        assert compiled[step] == pytest.approx(reference[step], rel=LOSS_RTOL), step
    compiles = json.loads((run / "summary.json").read_text())["compiles"]
    assert 1 <= compiles <= max_compiles < STEPS
    assert f"{compiles} compiles of the transformer blocks" in result.stdout
    assert json.loads((eager / "summary.json").read_text())["compiles"] is None

"""benchmarks/perf.py part ``floor`` (issue 16): the work one extra client teacher adds to a
distillation iteration, counted over whole ``distill()`` calls, is exactly that teacher's
passes in isolation (forward with input gradient, backward, no-grad forward at the
distillation batch): the loop adds no per-teacher work of its own, so its slope can only
shrink with a faster rate for the same arithmetic."""

from __future__ import annotations

import pytest

from abd_fl.paths import compose_config
from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def perf():
    yield from benchmark_module("perf")


def test_extra_teacher_work_equals_its_isolated_passes(perf) -> None:
    batch = int(compose_config([])["distill"]["batch_size"])
    per_teacher = perf.teacher_flops_per_iteration(iterations=1)
    alone = perf.teacher_pass_rate(batch, repeats=1)
    assert per_teacher > 0
    assert per_teacher == pytest.approx(alone["flops"], rel=1e-6)
    assert alone["seconds"] > 0 and alone["gflops"] > 0


def test_floor_table_names_the_loop_slope(perf) -> None:
    lines = perf.compute_floor(0.5, multiples=(1,))
    text = "\n".join(lines)
    assert "MFLOP" in text and "floor of an ideal vectorised ensemble" in text
    assert "loop slope (part scale) 500.0 ms" in text


def test_teacher_memory_counts_weights_and_activations_linear_in_batch(perf) -> None:
    """Part ``memory``: the weights do not depend on the batch, the saved activations grow
    linearly with it (so the per-client RSS slope is set by the distillation batch)."""
    w64, saved64, n64 = perf.teacher_memory_bytes(64)
    w128, saved128, n128 = perf.teacher_memory_bytes(128)
    assert w64 == w128 > 0
    assert n64 == n128 > 0
    assert saved128 == 2 * saved64
    assert "activations autograd keeps" in "\n".join(perf.teacher_memory(32))

"""The bench's host-side pieces (CPU): the routing counts it draws and its tables with and without
DeepGEMM's columns."""

import pytest

from moegemm import bench


def test_routing_counts_are_fixed_and_spread_around_the_mean():
    counts = bench.routing_counts(32, 192)
    assert counts == bench.routing_counts(32, 192)  # a fixed seed: every run sees the same experts
    low, high = bench.ROUTING_SPREAD
    assert all(low * 192 - 1 <= c <= high * 192 + 1 for c in counts)
    assert len(set(counts)) > 16  # uneven, not one count repeated
    assert counts != bench.routing_counts(32, 192, seed=1)


def _row(**deepgemm):
    return bench.GemmRow(4096, 7168, 16384, 675.6, 1424.0, 0.36, 722.9, 1.07, 669.0, 1171.8, 1e-6, 1e-3, **deepgemm)


@pytest.mark.parametrize("with_deepgemm", [False, True])
def test_gemm_table_prints_deepgemm_ratios_only_when_timed(capsys, with_deepgemm):
    row = _row(deepgemm_us=647.3, vs_deepgemm=647.3 / 675.6) if with_deepgemm else _row()
    bench.print_gemm_table("title", [row])
    out = capsys.readouterr().out
    assert "675.6" in out and "722.9" in out
    assert ("647.3" in out and "0.958" in out and "DeepGEMM's time over ours at M >= 4096: geometric mean 0.958"
            in out) == with_deepgemm
    assert ("n/a" in out) != with_deepgemm

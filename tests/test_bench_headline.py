"""MEG's headline, modelled: the merged latent's bits follow the paper's B(r), and MEG's
end-to-end latency at SDXL 1024² stays below conventional edge generation's."""

from __future__ import annotations

from meg.bench.headline import run_headline


def test_headline_rows_follow_the_papers_bit_count_and_beat_ceg() -> None:
    rows = run_headline(steps=(8,), distances_m=(200.0, 300.0), merge_ratios=(0.0, 0.5))
    assert len(rows) == 4
    for row in rows:
        r = int(row.merge_ratio * 4096)  # merged tokens of the 64×64-token grid
        assert row.meg_bits == 1_048_576 - 240 * r  # PAPERS.md §1: B(r) = 1,048,576 − 240·r
        assert row.ceg_bits == 24 * 1024 * 1024
        assert 0 < row.meg_latency_s < row.ceg_latency_s
    near, far = (r for r in rows if r.merge_ratio == 0.5)
    assert far.latency_reduction > near.latency_reduction  # the worse the link, the more MEG saves

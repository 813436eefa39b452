"""Properties of the VL2 layout: for any tile grid the spliced sequence has exactly the closed-form
number of embeddings (newline and separator slots included), in the official order."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmstack.vision.layout import Layout, LayoutConfig, splice
from mmstack.vision.tiling import num_image_tokens


@settings(max_examples=60, deadline=None)
@given(tw=st.integers(1, 9), th=st.integers(1, 9), side=st.sampled_from([1, 3, 14]))
def test_vl2_layout_length_matches_closed_form(tw, th, side):
    if tw * th > 9:
        tw, th = 1, min(th, 9)
    lay = Layout(LayoutConfig("vl2_tiles", n_embed=2))
    tiles = torch.randn(1 + tw * th, side * side, 2)
    seq = lay.vl2_image(tiles, tw, th)
    assert seq.shape[0] == num_image_tokens(tw, th, side * 14 * 2, 14, 2)
    if side == 14:
        assert seq.shape[0] == 211 + 14 * th * (14 * tw + 1)


def test_vl2_layout_order_global_separator_then_stitched_rows():
    lay = Layout(LayoutConfig("vl2_tiles", n_embed=1))
    with torch.no_grad():
        lay.image_newline.fill_(-1)
        lay.view_separator.fill_(-2)
    h = 2
    tiles = torch.arange(3 * h * h, dtype=torch.float32).view(3, h * h, 1)  # global + 2 tiles side by side
    seq = lay.vl2_image(tiles, tw=2, th=1)[:, 0].tolist()
    glob = [0, 1, -1, 2, 3, -1]
    local = [4, 5, 8, 9, -1, 6, 7, 10, 11, -1]  # tile k at column k: rows are stitched across tiles
    assert seq == glob + [-2] + local


def test_splice_refuses_a_count_mismatch():
    import pytest

    emb = torch.zeros(1, 5, 2)
    mask = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)
    assert splice(emb, mask, torch.ones(2, 2))[0, 1:3].eq(1).all()
    with pytest.raises(ValueError, match="2 image-token slots but 3"):
        splice(emb, mask, torch.ones(3, 2))

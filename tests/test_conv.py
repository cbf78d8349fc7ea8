"""Convolutions as convolutions: the input elements an im2col tile needs, and the device's walk
over on-chip im2col operands equal to the closed form."""
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fqtsim.cost
from conftest import HW_DIR, SHIPPED
from fqtsim import load_hw
from fqtsim.hardware.conv import Im2col, col2im, row_tiles
from test_cost import VARIANTS, assert_same, run_both


def listed(win: Im2col, r0: int, r1: int) -> set:
    """The (sample, y, x) pixels under rows [r0, r1), by walking every window tap."""
    (kh, kw), (sh, sw), (ph, pw) = win.kernel, win.stride, win.padding
    out = set()
    for r in range(r0, r1):
        sample, position = divmod(r, win.positions)
        oy, ox = divmod(position, win.out_w)
        for ky, kx in itertools.product(range(kh), range(kw)):
            y, x = oy * sh - ph + ky, ox * sw - pw + kx
            if 0 <= y < win.in_h and 0 <= x < win.in_w:
                out.add((sample, y, x))
    return out


@st.composite
def geometries(draw, samples=3, channels=3, size=11):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h, w = draw(st.integers(kh, size)), draw(st.integers(kw, size))
    return Im2col(draw(st.integers(1, samples)), draw(st.integers(1, channels)), h, w, (kh, kw),
                  (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                  (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(win=geometries(), data=st.data())
def test_pixels_under_any_run_of_rows_are_the_listed_ones(win, data):
    r0 = data.draw(st.integers(0, win.rows - 1))
    r1 = data.draw(st.integers(r0 + 1, win.rows))
    assert int(win.pixels(r0, r1)) == len(listed(win, r0, r1))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(win=geometries(), data=st.data())
def test_row_tiles_classes_cover_every_tile(win, data):
    tile = data.draw(st.integers(1, win.rows))
    tiles = row_tiles(win, tile)
    each, new, seen = [], [], set()
    for r0 in range(0, win.rows, tile):
        pixels = listed(win, r0, min(r0 + tile, win.rows))
        each.append(len(pixels))
        new.append(len(pixels - seen))
        seen |= pixels
    assert int(tiles.count.sum()) == len(each)
    assert (tiles.each[0], tiles.new[0]) == (each[0], new[0])
    assert tiles.total == sum(each)
    assert int((tiles.count * tiles.new).sum()) == sum(new) == len(seen) == win.elements // win.channels
    assert set(zip(tiles.each.tolist(), tiles.new.tolist())) == set(zip(each, new))


def test_col2im_counts_overlapping_entries():
    win = Im2col(2, 3, 6, 6, 3, 1, 1)            # 3x3 same padding: 9 taps, border ones cut
    entries, elements = col2im(win)
    assert elements == 2 * 3 * 36
    assert entries == 2 * 3 * (6 * 3 - 2) ** 2     # 16 inside taps per axis
    assert col2im(Im2col(1, 4, 8, 8, 1, 2)) == (64, 64)   # 1x1 stride 2: nothing overlaps


def test_geometry_is_validated():
    with pytest.raises(ValueError, match="kernel"):
        Im2col(1, 1, 2, 2, 3)
    with pytest.raises(ValueError, match="stride"):
        Im2col(1, 1, 4, 4, 3, 0)
    with pytest.raises(ValueError, match="samples"):
        Im2col(0, 1, 4, 4, 3)


CONV_VARIANTS = {name: VARIANTS[name] for name in
                 ("m outer", "given tiles", "k tiled", "tiny tcm", "searched order", "partitions",
                  "small partitions", "partitions, k tiled", "parked partial sums", "k between",
                  "k outer", "k outer, tiny tcm", "k between, searched tiles")}
ROLES = ("forward", "grad_weight", "grad_input")


def conv_case(win: Im2col, role: str, cout: int) -> dict:
    """The GEMM of one pass of a convolution with `cout` output channels."""
    if role == "forward":
        return dict(m=win.rows, n=cout, k=win.cols, a_im2col=win)
    if role == "grad_weight":
        return dict(m=cout, n=win.cols, k=win.rows, b_im2col=win)
    return dict(m=win.rows, n=win.cols, k=cout, col2im=win, writeback="handoff")


@pytest.mark.parametrize("config", SHIPPED + [f"npu: {v}" for v in CONV_VARIANTS])
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(win=geometries(samples=4, channels=6, size=12), role=st.sampled_from(ROLES),
       cout=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_conv_ledger_equals_closed_form(make_hw, config, win, role, cout, seed):
    name, _, variant = config.partition(": ")
    hw = make_hw(name, **CONV_VARIANTS[variant]) if variant else load_hw(HW_DIR / f"{name}.yaml")
    assert_same(run_both(hw, seed=seed, **conv_case(win, role, cout)))


def test_a_3x3_conv_loads_its_feature_map_not_its_im2col_matrix():
    hw = load_hw(HW_DIR / "npu.yaml")
    win = Im2col(8, 64, 28, 28, 3, 1, 1)
    conv = fqtsim.cost.gemm(hw, win.rows, 64, win.cols, a_im2col=win)
    dense = fqtsim.cost.gemm(hw, win.rows, 64, win.cols)
    load = lambda ledger: ledger.loc[ledger.event == "load_a", "bytes"].sum()   # noqa: E731
    assert win.elements <= load(conv) < load(dense) / 3
    macs = lambda ledger: ledger.loc[ledger.event.str.startswith("mac"), "count"].sum()  # noqa: E731
    assert macs(conv) == macs(dense)


def test_conv2d_costs_the_forward_pass_of_a_convolution():
    hw = load_hw(HW_DIR / "npu.yaml")
    ledger = fqtsim.cost.conv2d(hw, 4, 64, 56, 56, 64, 3, stride=1, padding=1)
    win = Im2col(4, 64, 56, 56, 3, 1, 1)
    assert ledger.attrs["mapping"]["m"] == 4 * 56 * 56 and ledger.attrs["mapping"]["k"] == 576
    same = fqtsim.cost.gemm(hw, win.rows, 64, win.cols, a_im2col=win, name="conv")
    assert ledger.equals(same)
    strided = fqtsim.cost.conv2d(hw, 1, 8, 9, 9, 4, (3, 1), stride=(2, 1), padding=(1, 0))
    assert strided.attrs["mapping"]["m"] == 5 * 9
    with pytest.raises(ValueError, match="c_out"):
        fqtsim.cost.conv2d(hw, 1, 8, 9, 9, 0, 3)
    with pytest.raises(ValueError, match="kernel"):
        fqtsim.cost.conv2d(hw, 1, 8, 2, 2, 4, 3)

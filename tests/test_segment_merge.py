"""The segment merge block by block == today's whole-image merge, and the tiling at many items.

Real data: the DSB2018 nucleus image (``../shared/data/segmentation/stardist_dsb2018``), segmented
by the classical engine in 96-px tiles so that nuclei cross tile seams and blocks.
"""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from atlas.science.segmentation import make_engine
from atlas.science.segmentation.tiling import (
    assign_tiles,
    calibration_sample,
    chunk_grid,
    expand_to_cells,
    grown_area,
    job_tiles,
    merge_tiles,
    paint_tiles,
    relabel_sequential_blocks,
    segment_tile,
    tile_grid,
    working_view,
)


@pytest.fixture(scope="module")
def tile_results(dsb):
    engine, view = working_view(dsb[0], make_engine("classical"), None)
    calibration = engine.calibrate(calibration_sample(view))
    return [segment_tile(view, core, engine, calibration, 32) for core in tile_grid(view.native_shape, 96)]


@pytest.mark.parametrize(("block", "chunk"), [(64, 32), (128, 64), (512, 512)])
def test_block_merge_equals_the_whole_image_merge(dsb, tile_results, tmp_path, block, chunk):
    shape = dsb[0].shape
    nuclei = np.zeros(shape, np.uint32)        # today's merge: one whole-image array
    n = relabel_sequential_blocks(nuclei, paint_tiles(tile_results, nuclei))
    cells = np.zeros_like(nuclei)
    expand_to_cells(nuclei, cells, 3.0)

    def scratch(name):
        return zarr.create_array(store=str(tmp_path / f"{name}.zarr"), shape=shape, chunks=(chunk, chunk),
                                 dtype=np.uint32, fill_value=0)

    canvas, z_nuclei, z_cells = scratch("painted"), scratch("nuclei"), scratch("cell")
    assert merge_tiles(iter(tile_results), canvas, z_nuclei, z_cells, 3.0, block=block) == n
    assert n > 50 and np.array_equal(z_nuclei[:], nuclei) and np.array_equal(z_cells[:], cells)
    assert len(tile_results) > 1 and len(chunk_grid(shape, block)) == (-(-shape[0] // block)) ** 2


def test_chunk_grid_covers_whole_chunks():
    blocks = chunk_grid((300, 500), 128)
    covered = np.zeros((300, 500), np.uint8)
    for y0, y1, x0, x1 in blocks:
        assert y0 % 128 == 0 and x0 % 128 == 0
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()


def test_tiles_of_a_whole_slide_are_shared_by_its_many_items():
    """The 1,000-tile target (~65k px square) over 42 items (one per 100 MP): every tile once, the
    items' pixels within a tile of each other."""
    shape, items = (65_000, 65_000), 42
    tiles, shares = job_tiles(shape, 2048, 128, items)
    assert sorted(n for share in shares for n in share) == list(range(len(tiles)))
    loads = [sum(grown_area(tiles[n], shape, 128) for n in share) for share in shares]
    assert max(loads) - min(loads) <= max(grown_area(t, shape, 128) for t in tiles)
    # the heap gives the same shares as taking the least-loaded job, lowest number first
    small = tile_grid((2878, 4237), 1024)
    work = [grown_area(t, (2878, 4237), 64) for t in small]
    loads, expected = [0] * 3, [[], [], []]
    for k in sorted(range(len(small)), key=lambda k: (-work[k], k)):
        j = min(range(3), key=lambda j: (loads[j], j))
        loads[j] += work[k]
        expected[j].append(k)
    assert assign_tiles(small, (2878, 4237), 64, 3) == [sorted(e) for e in expected]

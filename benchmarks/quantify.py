"""Benchmark: ``atlas quantify`` end to end vs MCQuant's algorithm, ~200k cells x 10 channels.

Inputs are real: the steinbock IMC ROI ``20210305_NE_mockData2_001`` (float32, 5 channels, 55
DeepCell cells) from ``../shared/data/quantification/steinbock_imc``, tiled ``--grid`` x ``--grid``
with label offsets (61 x 61 -> 204,655 cells, 5307 x 6283 px), channels taken twice -> 10 channels.
They are written to a temporary folder as tiled (1024 px) OME-TIFFs, uncompressed, so that both
sides pay the same small cost for reading and the figures compare the quantification itself.

Both sides run as their own process, one after the other, timed from start to exit by this one
(so interpreter start and imports count), each peak RSS its own (``wait4``'s ``ru_maxrss``):

* ours: the ``atlas quantify`` console command (``--image --mask --markers -o``): reading the
  files, the table, and writing it as CSV, Parquet and .h5ad;
* MCQuant's algorithm (labsyspharm/quantification ``mcquant/SingleCellDataExtraction.py``, read at
  61a1f53): ``tifffile.imread`` of the mask; per channel ``tifffile.imread(image, key=c)`` and
  ``regionprops_table(mask, channel, properties=("intensity_mean",))``; the shape properties once
  (``regionprops_table`` with MCQuant's ``MaskIDs`` list); one DataFrame in its column order,
  ``to_csv``.

Each side runs ``--repeat`` times (default 2), the sides alternating, and its best wall time
counts. Prints the machine's load average before and after, wall and CPU seconds, peak RSS, the
ratio, and the largest differences between the two CSVs (MCQuant's means are float32 sums:
skimage's ``np.mean`` keeps the image dtype; ours are scipy.ndimage.mean's).

    .venv/bin/python benchmarks/quantify.py [--grid 61] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.realdata import data_root  # noqa: E402  (../shared/data, or fetched)

DATA = data_root() / "quantification" / "steinbock_imc"
ROI = "20210305_NE_mockData2_001"
MARKERS = ["Ag107", "Cytokeratin 5", "Laminin", "YBX1", "H3K27Ac"]
# MCQuant's MaskIDs properties, renamed as it renames them.
MASK_PROPERTIES = {"label": "CellID", "centroid-1": "X_centroid", "centroid-0": "Y_centroid", "area": "Area",
                   "major_axis_length": "MajorAxisLength", "minor_axis_length": "MinorAxisLength",
                   "eccentricity": "Eccentricity", "solidity": "Solidity", "extent": "Extent",
                   "orientation": "Orientation"}


def make_inputs(folder: Path, grid: int) -> None:
    """Tile the real ROI ``grid`` x ``grid`` (labels offset per tile) into tiled OME-TIFFs + markers.csv."""
    import tifffile

    image = tifffile.imread(DATA / "img" / f"{ROI}.tiff")
    mask = tifffile.imread(DATA / "masks_deepcell" / f"{ROI}.tiff").astype(np.uint32)
    n = int(mask.max())
    offsets = np.kron((np.arange(grid * grid, dtype=np.uint32) * n).reshape(grid, grid),
                      np.ones(mask.shape, np.uint32))
    tiled = np.tile(mask, (grid, grid))
    tiled = np.where(tiled > 0, tiled + offsets, 0).astype(np.uint32)
    del offsets
    names = MARKERS + [f"{m}_copy" for m in MARKERS]
    tifffile.imwrite(folder / "cell.ome.tif", tiled, tile=(1024, 1024), ome=True, bigtiff=True,
                     metadata={"axes": "YX"})
    del tiled
    tifffile.imwrite(folder / "bench.ome.tif", np.tile(image, (2, grid, grid)), tile=(1024, 1024), ome=True,
                     bigtiff=True, metadata={"axes": "CYX", "Channel": {"Name": names}})
    (folder / "markers.csv").write_text("marker_name\n" + "\n".join(names) + "\n")


def mcquant(folder: Path) -> None:
    """MCQuant's algorithm on the inputs in ``folder``; writes ``mcquant/bench_cell.csv``."""
    import pandas as pd
    import tifffile
    from skimage.measure import regionprops_table

    image = folder / "bench.ome.tif"
    names = pd.read_csv(folder / "markers.csv")["marker_name"].tolist()
    mask = tifffile.imread(folder / "cell.ome.tif")
    columns = {}
    for c, name in enumerate(names):
        columns[name] = regionprops_table(mask, tifffile.imread(image, key=c),
                                          properties=("intensity_mean",))["intensity_mean"]
    shape = regionprops_table(mask, properties=tuple({p.split("-")[0] for p in MASK_PROPERTIES}))
    table = {"CellID": shape["label"], **columns}
    table.update({ours: shape[theirs] for theirs, ours in MASK_PROPERTIES.items() if ours != "CellID"})
    (folder / "mcquant").mkdir(exist_ok=True)
    pd.DataFrame(table).to_csv(folder / "mcquant" / "bench_cell.csv", index=False)


def timed(command: list[str]) -> dict[str, float]:
    """Run ``command`` to completion; its wall seconds, CPU seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{command[0]} failed with exit code {process.returncode}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def compare(folder: Path) -> tuple[dict[str, float], int, bool]:
    """Largest differences ours vs MCQuant (relative for means), cells, and whether headers agree."""
    import pandas as pd

    ours = pd.read_csv(folder / "ours" / "bench_cell.csv", float_precision="round_trip")
    ref = pd.read_csv(folder / "mcquant" / "bench_cell.csv", float_precision="round_trip")
    assert np.array_equal(ours["CellID"].to_numpy(), ref["CellID"].to_numpy()), "different cells"
    markers = [c for c in ref.columns if c not in MASK_PROPERTIES.values()]
    a, b = ours[markers].to_numpy(), ref[markers].to_numpy()
    diffs = {"means (relative)": float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300), initial=0.0))}
    for column in MASK_PROPERTIES.values():
        diffs[column] = float(np.max(np.abs(ours[column].to_numpy() - ref[column].to_numpy()), initial=0.0))
    return diffs, len(ours), list(ours.columns) == list(ref.columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, default=61, help="tiles per side (61 -> 204,655 cells)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side; the best counts (noisy machines)")
    parser.add_argument("--worker", choices=("inputs", "mcquant"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "inputs":
        make_inputs(args.folder, args.grid)
        return
    if args.worker == "mcquant":
        mcquant(args.folder)
        return
    load_before = os.getloadavg()
    atlas = str(Path(sys.executable).parent / "atlas")
    with tempfile.TemporaryDirectory(prefix="bench-quantify-") as tmp:
        folder = Path(tmp)
        # inputs made by a child, so that this process stays small (its children inherit nothing big)
        subprocess.run([sys.executable, __file__, "--worker", "inputs", "--folder", tmp, "--grid", str(args.grid)],
                       check=True, cwd=ROOT)
        commands = {
            "ours": [atlas, "quantify", "--image", str(folder / "bench.ome.tif"),
                     "--mask", str(folder / "cell.ome.tif"), "--markers", str(folder / "markers.csv"),
                     "-o", str(folder / "ours")],
            "MCQuant": [sys.executable, __file__, "--worker", "mcquant", "--folder", tmp],
        }
        runs: dict[str, list] = {side: [] for side in commands}
        for _ in range(args.repeat):   # the sides alternate, so that both meet the load as it changes
            for side, command in commands.items():
                runs[side].append(timed(command))
        results = {side: min(r, key=lambda r: r["wall_s"]) for side, r in runs.items()}
        diffs, cells, same_header = compare(folder)
    ours, ref = results["ours"], results["MCQuant"]
    print(f"inputs: {cells} cells x 10 channels, {args.grid}x{args.grid} tiles of the real ROI {ROI}, "
          f"best of {args.repeat}; load average (1, 5, 15 min) before "
          f"{', '.join(f'{x:.2f}' for x in load_before)}, after {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    for side, r in results.items():
        print(f"{side:>8}: {r['wall_s']:8.2f} s wall  {r['cpu_s']:8.2f} s CPU  peak RSS {r['peak_rss_mib']:7.0f} MiB")
    print(f"ratio: {ref['wall_s'] / ours['wall_s']:.1f}x wall, {ref['cpu_s'] / ours['cpu_s']:.1f}x CPU "
          f"(ours = atlas quantify end to end: start, reading, CSV + Parquet + h5ad); "
          f"peak RSS {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f} of MCQuant's")
    print(f"same CSV header: {same_header}; largest differences:", ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    print(json.dumps({"ratio_wall": round(ref["wall_s"] / ours["wall_s"], 2), "ours": ours, "mcquant": ref}))


if __name__ == "__main__":
    main()

"""Benchmark: atlas quantification vs ``skimage.measure.regionprops_table`` (MCQuant's engine).

Inputs are real: the steinbock IMC ROI ``20210305_NE_mockData2_001`` (float32, 5 channels, 55
DeepCell cells) from ``../shared/data/quantification/steinbock_imc``, tiled ``--grid`` x ``--grid``
with label offsets (61 x 61 -> 204,655 cells, 5307 x 6283 px), channels taken twice -> 10 channels.
They are written to a temporary folder as tiled (1024 px) OME-TIFFs, uncompressed so that both
sides pay the same small cost for reading and the figures compare the quantification itself.

Each side runs in its own subprocess, one after the other, so that each peak RSS is its own:

* ours: :func:`atlas.stages.quantify.quantify_files` -- reads the files strip by strip;
* reference: ``tifffile.imread`` of image and mask, then ``regionprops_table(mask,
  intensity_image=image (Y, X, C), properties=MCQuant's)`` -- what MCQuant computes.

Each side runs ``--repeat`` times (default 2) and its best figures count. Prints wall and CPU
seconds, peak RSS (Linux ``VmHWM``), the speed ratios and the largest differences between the two
tables (the reference's means are float32 sums: skimage's ``np.mean`` keeps the image dtype).

    .venv/bin/python benchmarks/quantify.py [--grid 61]
"""
from __future__ import annotations

import argparse
import json
import resource
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
# MCQuant's MaskIDs properties plus its default intensity property.
MCQUANT_PROPERTIES = ("label", "centroid", "area", "major_axis_length", "minor_axis_length", "eccentricity",
                      "solidity", "extent", "orientation", "intensity_mean")
REFERENCE_NAMES = {"label": "CellID", "centroid-1": "X_centroid", "centroid-0": "Y_centroid", "area": "Area",
                   "major_axis_length": "MajorAxisLength", "minor_axis_length": "MinorAxisLength",
                   "eccentricity": "Eccentricity", "solidity": "Solidity", "extent": "Extent",
                   "orientation": "Orientation"}


def make_inputs(folder: Path, grid: int) -> tuple[Path, Path, list[str]]:
    """Tile the real ROI ``grid`` x ``grid`` (labels offset per tile) into tiled OME-TIFFs."""
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
    image_path, mask_path = folder / "bench.ome.tif", folder / "cell.ome.tif"
    tifffile.imwrite(mask_path, tiled, tile=(1024, 1024), ome=True, bigtiff=True, metadata={"axes": "YX"})
    del tiled
    tifffile.imwrite(image_path, np.tile(image, (2, grid, grid)), tile=(1024, 1024), ome=True, bigtiff=True,
                     metadata={"axes": "CYX", "Channel": {"Name": names}})
    return image_path, mask_path, names


def run_ours(image_path: Path, mask_path: Path, names: list[str], out: Path) -> None:
    from atlas.stages.quantify import quantify_files

    tables, _ = quantify_files(image_path, {"cell": mask_path}, names, [False] * len(names))
    tables["cell"].to_parquet(out)


def run_reference(image_path: Path, mask_path: Path, names: list[str], out: Path) -> None:
    import pandas as pd
    import tifffile
    from skimage.measure import regionprops_table

    image, mask = tifffile.imread(image_path), tifffile.imread(mask_path)
    props = regionprops_table(mask, intensity_image=np.moveaxis(image, 0, -1), properties=MCQUANT_PROPERTIES)
    table = pd.DataFrame({REFERENCE_NAMES[k]: v for k, v in props.items() if k in REFERENCE_NAMES})
    for i, name in enumerate(names):
        table[name] = props[f"intensity_mean-{i}"]
    table.to_parquet(out)


def worker(side: str, folder: Path) -> None:
    """Run one side on the inputs in ``folder``; print its figures as JSON."""
    import pandas  # noqa: F401
    import skimage.measure  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    import atlas.stages.quantify  # noqa: F401  (imports are not what is measured)

    spec = json.loads((folder / "inputs.json").read_text())
    wall, cpu = time.perf_counter(), time.process_time()
    (run_ours if side == "ours" else run_reference)(Path(spec["image"]), Path(spec["mask"]), spec["names"],
                                                    folder / f"{side}.parquet")
    print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                      "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux's VmHWM belongs to the address space since exec; getrusage's
    maxrss would also count the parent's memory, inherited at fork."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare(folder: Path, names: list[str]) -> tuple[dict[str, float], int]:
    """Largest differences, ours vs reference (relative for means, absolute for morphology); cells."""
    import pandas as pd

    ours, ref = pd.read_parquet(folder / "ours.parquet"), pd.read_parquet(folder / "reference.parquet")
    assert np.array_equal(ours["CellID"].to_numpy(), ref["CellID"].to_numpy()), "different cells"
    a, b = ours[names].to_numpy(), ref[names].to_numpy()
    diffs = {"means (relative)": float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300), initial=0.0))}
    for column in REFERENCE_NAMES.values():
        diffs[column] = float(np.max(np.abs(ours[column].to_numpy() - ref[column].to_numpy()), initial=0.0))
    return diffs, len(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, default=61, help="tiles per side (61 -> 204,655 cells)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side; the best counts (noisy machines)")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder)
        return
    with tempfile.TemporaryDirectory(prefix="bench-quantify-") as tmp:
        folder = Path(tmp)
        image_path, mask_path, names = make_inputs(folder, args.grid)
        (folder / "inputs.json").write_text(json.dumps({"image": str(image_path), "mask": str(mask_path),
                                                        "names": names}))
        results = {}
        for side in ("ours", "reference"):
            runs = []
            for _ in range(args.repeat):
                done = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", str(folder)],
                                      check=True, capture_output=True, text=True, cwd=ROOT)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            results[side] = {key: min(r[key] for r in runs) for key in runs[0]}
        diffs, cells = compare(folder, names)
    ours, ref = results["ours"], results["reference"]
    print(f"inputs: {cells} cells x {len(names)} channels, {args.grid}x{args.grid} tiles of the real ROI {ROI}")
    for side, r in results.items():
        print(f"{side:>9}: {r['wall_s']:8.2f} s wall  {r['cpu_s']:8.2f} s CPU  peak RSS {r['peak_rss_mib']:8.0f} MiB")
    print(f"speed-up: {ref['wall_s'] / ours['wall_s']:.1f}x wall, {ref['cpu_s'] / ours['cpu_s']:.1f}x CPU; "
          f"peak RSS {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f} of the reference's")
    print("largest differences:", ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()

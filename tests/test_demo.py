"""`atlas demo`, the README's main command, end to end: events in, results and an overview out.

Runs the real command in a fresh process (moto server on a free port, the real Lambda handlers,
every registry stage as `atlas stage` jobs); it takes a minute or two.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from atlas import layout


def test_demo_runs_the_sample_slide_from_upload_to_overview(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, "-m", "atlas", "demo", "-o", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # the event-driven path: four objects catalogued, one run started and finished
    assert len(re.findall(r"catalog +sample/\S+: recorded", output)) == 4
    assert re.search(r"slide sample: SUCCEEDED \(run (sample-[0-9a-f]{12})\)", output), output
    run_id = re.search(r"\(run (sample-[0-9a-f]{12})\)", output).group(1)
    # the published results, copied to disk, with the overview page to open
    results = tmp_path / "out" / "results" / "sample" / run_id
    overview = Path(re.search(r"^overview: (\S+)$", output, re.MULTILINE).group(1))
    assert overview == (results / layout.OVERVIEW / "index.html").resolve() and overview.is_file()
    manifest = json.loads((results / layout.MANIFEST).read_text())
    published = {f["path"] for f in manifest["files"]}
    assert layout.registration_tiff("sample") in published
    assert any(p.startswith(layout.QUANTIFICATION + "/") for p in published)
    assert all((results / p).is_file() for p in published)
    # the overview site as published: the portal lists the slide, its overview tells a drafted story
    portal = Path(re.search(r"^portal: +(\S+)$", output, re.MULTILINE).group(1))
    assert portal == (tmp_path / "out" / "site" / "index.html").resolve() and portal.is_file()
    index = json.loads((portal.parent / "index.json").read_text())
    assert [(s["slide_id"], s["run_id"]) for s in index["slides"]] == [("sample", run_id)]
    exhibit = json.loads((portal.parent / index["slides"][0]["overview"]).with_name("exhibit.json").read_text())
    waypoints = exhibit["Stories"][0]["Waypoints"]
    assert [w["Name"] for w in waypoints][0] == "Overview"
    assert [w["Group"] for w in waypoints[1:]] == [g["Name"] for g in exhibit["Groups"]]   # one per group
    # the lab was told
    assert "notification: [atlas] sample: SUCCEEDED" in output


def test_the_cli_and_the_handlers_load_without_the_demo_harness():
    """The images hold atlas/, the Lambda asset atlas/ and functions/: neither has localcloud/ (infra.bundling
    SOURCES, containers/*/Dockerfile), so nothing they import may need it."""
    from infra.bundling import SOURCES

    assert "localcloud" not in SOURCES
    for dockerfile in Path(__file__).resolve().parents[1].glob("containers/*/Dockerfile"):
        assert "localcloud" not in dockerfile.read_text(), dockerfile
    code = ("import sys; sys.modules['localcloud'] = None\n"
            "import json, typer.main; from atlas.cli import app\n"
            "print(json.dumps(sorted(typer.main.get_command(app).commands)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"demo", "stage", "upload", "status"} <= set(json.loads(proc.stdout))
    env = {**os.environ, "CATALOG_TABLE": "t", "IDEMPOTENCY_TABLE": "i", "STATE_MACHINE_ARN": "arn",
           "NOTIFY_TOPIC_ARN": "topic", "INGEST_BUCKET": "in", "WORK_BUCKET": "w", "RESULTS_BUCKET": "r",
           "BUCKET_OWNER": "123456789012", "AWS_DEFAULT_REGION": "us-east-1"}
    for name in ("catalog", "trigger", "status"):
        handler = f"import sys; sys.modules['localcloud'] = None; import functions.{name}.handler as h; h.handler"
        proc = subprocess.run([sys.executable, "-c", handler], capture_output=True, text=True, timeout=300, env=env,
                              cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr

"""``atlas story draft RESULTS_DIR > story.yml``: the story the overview drafts, as a starting point."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.params import RenderParams

story_app = typer.Typer(help="Stories of the overview (story.yml in the slide folder; see docs/overview.md).",
                        no_args_is_help=True)


@story_app.command("draft")
def draft(results: Path = typer.Argument(..., exists=True, file_okay=False,
                                         help="results folder of a run (atlas run -o OUT, or a downloaded release)"),
          markers: Path = typer.Option(None, "--markers", exists=True, dir_okay=False,
                                       help="markers.csv (default: the image's channel names)")) -> None:
    """Print the story the render stage drafts from the data (overview + one waypoint per channel group) as
    story.yml, to edit and put in the slide folder (or pass to `atlas rerun SLIDE --from render --story FILE`)."""
    from atlas.science.overview.source import TiffPyramid
    from atlas.slide.convention import read_markers
    from atlas.slide.story import dump_story
    from atlas.stages.render import draft as draft_story
    from atlas.storage import FolderStore

    images = sorted((results / layout.REGISTRATION).glob("*.ome.tif"))
    if not images:
        raise InvalidInput(Problem(str(results / layout.REGISTRATION), "has no registered image (*.ome.tif)",
                                   "give the results folder of a run that got past the stitch stage"))
    slide_id = images[0].name.removesuffix(".ome.tif")
    params = RenderParams()
    manifest = results / layout.MANIFEST
    if manifest.is_file():  # the parameters the run used
        params = RenderParams(**json.loads(manifest.read_text()).get("params", {}).get("render", {}))
    if markers is not None:
        names = [m.marker_name for m in read_markers(markers)]
    else:
        with TiffPyramid(images[0], params.tile_size) as pyramid:
            names = pyramid.channel_names
        if not names:
            raise InvalidInput(Problem(images[0].name, "has no channel names in its OME-XML",
                                       "give the slide's markers.csv with --markers"))
    story = draft_story(FolderStore(results), slide_id, names, params.channels_per_group, params.tile_size)
    header = (f"story.yml drafted from {results} by `atlas story draft` (slide {slide_id}).\n"
              "Edit it, put it in the slide folder as story.yml (or use `atlas rerun --story`); see docs/overview.md.")
    typer.echo(dump_story(story, header), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(story_app, name="story")

"""The run's progress: RunProgress's plain line, the rich bar on a terminal, lines elsewhere."""

import io

import pytest
from rich.console import Console as RichConsole

from pipeline.cli.progress import BarProgress, PlainProgress, open_display
from pipeline.jobs.report import RunProgress


def snapshot(**changes) -> RunProgress:
    values = dict(
        scenes_done=3,
        scenes_failed=0,
        scenes_skipped=0,
        scenes_known=10,
        discovery_finished=True,
        tiles_done=120,
        tiles_planned=400,
        busy_s=60.0,
    )
    return RunProgress(**{**values, **changes})


def test_the_line_when_nothing_failed():
    assert snapshot().line() == "scenes 3/10, tiles 120/400 (30%), 2.00 tiles/s, ETA 2m20s"


def test_the_line_counts_failures_skips_and_scenes_still_being_found():
    line = snapshot(scenes_failed=2, scenes_skipped=4, discovery_finished=False).line()
    assert line == (
        "scenes 9/10+ (4 skipped, 2 failed), tiles 120/400 (30%), 2.00 tiles/s, ETA >2m20s"
    )
    assert snapshot(tiles_done=0, busy_s=0.0).line().endswith("0.00 tiles/s, ETA ?")


def test_a_terminal_gets_a_live_bar_with_scenes_tiles_rate_eta_and_failures():
    out = io.StringIO()
    bar = BarProgress(RichConsole(file=out, force_terminal=True, width=160))
    bar.line("  done scene-a: 40 tiles (0 without data), 12 detections")
    bar.update(snapshot())
    bar.update(snapshot(scenes_done=4, scenes_failed=1, tiles_done=200))
    bar.close()
    text = out.getvalue()
    assert "done scene-a: 40 tiles" in text
    for part in ("scenes 5/10 (1 failed)", "tiles 200/400", "3.33 tiles/s", "ETA 1m00s"):
        assert part in text, part
    assert "━" in text  # the bar itself


def test_not_a_terminal_gets_the_plain_lines():
    out = io.StringIO()
    display = open_display(out)
    assert isinstance(display, PlainProgress)
    display.line("run r1: 10 scene(s), 10 to process, model m")
    display.update(snapshot(scenes_failed=1))
    display.close()
    assert out.getvalue().splitlines() == [
        "run r1: 10 scene(s), 10 to process, model m",
        "  scenes 4/10 (1 failed), tiles 120/400 (30%), 2.00 tiles/s, ETA 2m20s",
    ]


def test_the_bar_leaves_pythons_stderr_alone(capsys):
    """Quiet, sys.stderr is the log file: Ray's warnings written there stay off the terminal."""
    import sys

    out = io.StringIO()
    bar = BarProgress(RichConsole(file=out, force_terminal=True, width=160))
    print("Progress bars disabled. To enable, set ...", file=sys.stderr)
    bar.update(snapshot())
    bar.close()
    assert "Progress bars disabled" not in out.getvalue()
    assert "Progress bars disabled" in capsys.readouterr().err


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_gives_plain_lines_and_a_terminal_gets_a_bar(monkeypatch, verbose):
    """With ``-v`` Ray's and GDAL's log lines go to the terminal: the progress is plain lines
    there, not a bar they would break."""
    import pipeline.jobs.run
    from pipeline.cli.console import Console
    from pipeline.cli.main import run_with_display

    seen: dict = {}

    def fake_run_job(spec, **options):
        seen.update(options)
        return "report"

    monkeypatch.setattr(pipeline.jobs.run, "run_job", fake_run_job)
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    console = Console(out=terminal, err=io.StringIO(), verbose=verbose)
    assert run_with_display(object(), console, force=True) == "report"
    assert seen["force"] is True
    display = seen["progress"].__self__
    assert isinstance(display, PlainProgress if verbose else BarProgress)

"""A run's progress as the user sees it: a live bar on a terminal, plain lines elsewhere.

Both take :class:`~pipeline.jobs.report.RunProgress` snapshots (``update``) and the run's own
lines (``line``: a scene done or failed); the bar prints those above itself.
"""

from __future__ import annotations

from typing import IO, Protocol

from rich.console import Console as RichConsole
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from pipeline.jobs.report import RunProgress


class RunDisplay(Protocol):
    def line(self, text: str) -> None: ...
    def update(self, snapshot: RunProgress) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """CI, logs, ``submit --wait``: one line per call, the bar's numbers as text."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def update(self, snapshot: RunProgress) -> None:
        self.line(f"  {snapshot.line()}")

    def close(self) -> None:
        pass


class BarProgress:
    """A rich bar of tiles with scenes, tiles/s, ETA and failures so far beside it."""

    def __init__(self, console: RichConsole) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[scenes]}"),
            BarColumn(),
            TextColumn("{task.fields[tiles]}"),
            TextColumn("{task.fields[rate]} tiles/s"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            transient=False,
            # Python's stderr is the log file unless -v (and -v gets plain lines): rich would
            # print what Ray and GDAL write there above the bar.
            redirect_stderr=False,
        )
        self.task: TaskID = self.progress.add_task(
            "run", total=None, scenes="scenes 0/0+", tiles="tiles 0/0+", rate="0.00", eta="?"
        )
        self.progress.start()

    def line(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def update(self, snapshot: RunProgress) -> None:
        scenes = snapshot.scenes_text()
        if snapshot.scenes_failed:
            scenes = f"[red]{scenes}[/red]"
        self.progress.update(
            self.task,
            completed=snapshot.tiles_done,
            total=max(snapshot.tiles_planned, 1),
            scenes=scenes,
            tiles=f"tiles {snapshot.tiles_done}/{snapshot.tiles_planned}"
            + ("" if snapshot.discovery_finished else "+"),
            rate=f"{snapshot.tiles_per_s:.2f}",
            eta=snapshot.eta_text(),
        )

    def close(self) -> None:
        self.progress.stop()


def open_display(out: IO[str], plain: bool | None = None) -> RunDisplay:
    """A bar when ``out`` is a terminal (``plain`` None: decided by ``out``), else lines.

    ``georetina -v`` asks for lines: Ray's and GDAL's log lines would break a bar.
    """
    console = RichConsole(file=out)
    if plain is None:
        plain = not console.is_terminal or console.is_dumb_terminal
    return PlainProgress(out) if plain else BarProgress(console)

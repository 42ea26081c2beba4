"""Progress display: a rich live display on a terminal, plain log lines elsewhere (CI, files).

On a terminal (``orchestrator.progress = "auto"`` with a TTY, or ``"bar"``): a step bar with the
loss, samples/s (smoothed) and the ETA (rich's windowed speed estimate), a spinner row for each
phase (evaluation, explanations, checkpoint) while it runs, the per-step log lines scrolling above
the bar, and at the end a table of the validation metrics against their baselines. Elsewhere
(``"log"``, or auto without a TTY): only the log lines, one per logged step, as before.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from redheart.heads import validation_metrics

METRICS = tuple((m.name, m.higher) for m in validation_metrics())  # name, True when higher is better
SMOOTHING = 0.3  # weight of the newest step in the samples/s average


class Progress:
    def __init__(self, total_steps: int, mode: str = "auto", stream=None) -> None:
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.bar = mode == "bar" or (
            mode == "auto" and hasattr(self.stream, "isatty") and self.stream.isatty()
        )
        self.samples_per_second: float | None = None
        self._live = None
        self._task = None
        self._started = False
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        if self.bar:
            self._start_live()

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        # force_terminal: mode "bar" asks for the display even where the stream is no TTY.
        self.console = Console(file=self.stream, force_terminal=True)
        self._live = RichProgress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=self.console,
            redirect_stdout=False,
            redirect_stderr=False,
            speed_estimate_period=60.0,
        )
        self._live.start()
        self._task = self._live.add_task("steps", total=self.total, info="")
        # Log records written straight to the terminal would tear the live display: route the
        # handlers that write to our stream through the console (printed above the bar) meanwhile.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is self.stream:
                self._handlers.append((handler, handler.stream))
                handler.setStream(_ConsoleStream(self.console))

    def update(self, step: int, loss: float, samples_per_second: float) -> None:
        """step: steps completed so far."""
        if samples_per_second > 0:
            prev = self.samples_per_second
            self.samples_per_second = (
                samples_per_second
                if prev is None
                else (SMOOTHING * samples_per_second + (1 - SMOOTHING) * prev)
            )
        if self._live is None:
            return
        if not self._started:
            # A resumed run starts at step N: start the clock there, or the steps done before
            # would count as done in no time and the ETA would be far too short.
            self._live.reset(self._task, completed=step - 1)
            self._started = True
        rate = f"{self.samples_per_second:.1f} samples/s" if self.samples_per_second else ""
        self._live.update(self._task, completed=step, info=f"loss {loss:.4f}  {rate}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named phase (evaluation, explanations, checkpoint) shown as a spinner while it runs."""
        if self._live is None:
            yield
            return
        task = self._live.add_task(name, total=None, info="")
        try:
            yield
        finally:
            self._live.remove_task(task)

    def message(self, text: str) -> None:
        if self._live is not None:
            self.console.print(text, markup=False, highlight=False)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def summary(self, entry: dict[str, Any] | None) -> None:
        """The final validation metrics against their baselines, as a table (terminal only)."""
        if self._live is None or not entry or not entry.get("metrics"):
            return
        self.console.print(validation_table(entry))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers.clear()


class _ConsoleStream:
    """A file-like object for logging handlers that prints through a rich console."""

    def __init__(self, console) -> None:
        self.console = console

    def write(self, text: str) -> int:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


def validation_table(entry: dict[str, Any]):
    from rich.table import Table

    metrics, baseline = entry["metrics"], entry.get("baseline", {})
    table = Table(title=f"validation ({entry.get('label', 'final')}, step {entry.get('step', '?')})")
    for column, justify in (
        ("metric", "left"),
        ("model", "right"),
        ("baseline", "right"),
        ("vs baseline", "left"),
    ):
        table.add_column(column, justify=justify)
    for key, higher_better in ((metric.name, metric.higher) for metric in validation_metrics()):
        if key not in metrics:
            continue
        value, base = metrics[key], baseline.get(f"baseline_{key}")
        if base is None:
            verdict = ""
        else:
            better = value > base if higher_better else value < base
            verdict = "[green]better[/green]" if better else "[red]worse[/red]"
        table.add_row(
            key + (" (↑)" if higher_better else " (↓)"),
            f"{value:.4f}",
            "" if base is None else f"{base:.4f}",
            verdict,
        )
    return table

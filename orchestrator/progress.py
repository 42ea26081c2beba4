"""Progress display: a one-line bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import sys
import time


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    def __init__(self, total_steps: int, mode: str = "auto", stream=None) -> None:
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.bar = mode == "bar" or (mode == "auto" and hasattr(self.stream, "isatty") and self.stream.isatty())
        self.start = time.monotonic()
        self.first_step: int | None = None

    def update(self, step: int, loss: float, samples_per_second: float) -> None:
        """step: steps completed so far."""
        if not self.bar:
            return
        if self.first_step is None:
            self.first_step = step - 1
        done = step - self.first_step
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        line = (f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
                f"loss {loss:.4f} {samples_per_second:.1f} samples/s ETA {_fmt_eta(eta)}")
        self.stream.write(line)
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.bar:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()

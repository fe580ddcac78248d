"""Progress of long loops: a tqdm bar on a terminal, plain lines when the output is a file or a pipe.

tqdm redraws its bar with carriage returns, which a log file keeps as one unreadable line; a file or a
pipe gets one line per step instead (or at most one per `min_interval_s` seconds), and the last step
always gets its line:

    bar = progress(jobs, "prompts", unit="prompt", enabled=rank == 0)
    for job in bar:
        ...
        bar.set_postfix(fps=f"{fps:.2f}")     # shown on the bar, and at the end of the next line
        bar.write("a message")                # printed without breaking the bar

    prompts: 3/6 prompt (14.2 s, 4.73 s/prompt) fps=16.40

`nested=True` marks an inner loop (chunks of one video): a second bar below the outer one on a terminal,
nothing in a log file, where the outer loop's lines report the progress.
"""
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm


def progress(iterable: Iterable, desc: str, *, total: int | None = None, unit: str = "it", initial: int = 0,
             enabled: bool = True, nested: bool = False, min_interval_s: float = 0.0, file=None):
    """Iterate `iterable` with progress on `file` (default stderr): tqdm on a terminal, else LineProgress.

    total: the number of steps (default len(iterable) when it has one); initial: steps already done (a
    resumed run); enabled: False prints nothing (ranks other than 0); min_interval_s: the shortest time
    between two lines in line mode (the bar on a terminal refreshes as tqdm decides).
    """
    file = sys.stderr if file is None else file
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)
    if getattr(file, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, file=file, disable=not enabled,
                    dynamic_ncols=True, position=1 if nested else None, leave=not nested)
    return LineProgress(iterable, desc, total, unit, initial, enabled and not nested, min_interval_s, file)


class LineProgress:
    """Iterates like `iterable`, printing `desc: done/total unit (elapsed, time per unit) postfix` lines."""

    def __init__(self, iterable, desc, total, unit, initial, enabled, min_interval_s, file):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.done, self.enabled, self.min_interval_s, self.file = initial, enabled, min_interval_s, file
        self.postfix = ""
        self._start = self._last_line = None

    def __iter__(self) -> Iterator:
        self._start = time.monotonic()
        started_at = self.done
        for item in self.iterable:
            yield item
            self.done += 1
            self._report(self.done - started_at)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def write(self, message: str) -> None:
        print(message, file=self.file, flush=True)

    def line(self, steps: int) -> str:
        """The line for `steps` steps done by this process since it started iterating."""
        elapsed = time.monotonic() - self._start
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        rate = f", {elapsed / steps:.2f} s/{self.unit}" if steps else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {count} {self.unit} ({elapsed:.1f} s{rate}){postfix}"

    def _report(self, steps: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        last = self.total is not None and self.done >= self.total
        if last or self._last_line is None or now - self._last_line >= self.min_interval_s:
            self._last_line = now
            self.write(self.line(steps))

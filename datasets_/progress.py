"""A live progress line for long data work (``data prepare``, the first scan of a raw source):
what is done out of what is known, and the rate, on stderr.

The first line comes after ``TRANSFERLAB_PROGRESS_S`` seconds (default 5) and then one at most
every as many seconds, so quick jobs print nothing and long ones are never silent.
"""

from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, what: str, total_files: int | None = None):
        self.what, self.total_files = what, total_files
        self.every = float(os.environ.get("TRANSFERLAB_PROGRESS_S", "5"))
        self.start = self.last = time.monotonic()
        self.samples = 0
        self.files: set[str] = set()
        self.printed = False

    def update(self, file: str | None) -> None:
        """One more sample (from ``file``)."""
        self.samples += 1
        if file is not None:
            self.files.add(file)
        if self.samples % 256 == 0 and time.monotonic() - self.last >= self.every:
            self._print()

    def _print(self, final: bool = False) -> None:
        now = time.monotonic()
        self.last = now
        rate = self.samples / max(now - self.start, 1e-9)
        files = f", {len(self.files)}/{self.total_files} files" if self.total_files else ""
        word = "done" if final else "so far"
        print(
            f"{self.what}: {self.samples:,} samples read {word}{files}, {rate:,.0f} samples/s, "
            f"{now - self.start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        self.printed = True

    def close(self) -> None:
        if self.printed:
            self._print(final=True)

"""Progress for long work: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns, which a log file keeps as one
frame per redraw (tens of KB for one run). Where stderr is not a terminal,
`bar` prints a plain line instead, every `every` seconds and at the end:
`features: 2048/60000 (512/s, eta 113 s)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import contextlib
import sys
import time
from typing import TypeVar

T = TypeVar("T")


class Lines:
  """Plain progress lines every `every` seconds (for logs, not terminals)."""

  def __init__(self, total: int | None, desc: str, unit: str = "it", every: float = 10.0):
    self.total, self.desc, self.unit, self.every = total, desc, unit, every
    self.done, self.start, self.last, self.postfix = 0, time.monotonic(), 0.0, ""

  def update(self, n: int = 1) -> None:
    self.done += n
    now = time.monotonic()
    finished = self.total is not None and self.done >= self.total
    if now - self.last >= self.every or finished:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      of = f"/{self.total}" if self.total is not None else ""
      eta = (f", eta {(self.total - self.done) / rate:.0f} s"
             if self.total is not None and rate else "")
      postfix = f" [{self.postfix}]" if self.postfix else ""
      print(f"{self.desc}: {self.done}{of} {self.unit} ({rate:.1f}/s{eta}){postfix}",
            file=sys.stderr, flush=True)

  def set_postfix_str(self, text: str) -> None:
    self.postfix = text

  def close(self) -> None:
    pass


class _Off:
  """No output at all (`--quiet`)."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix_str(self, text: str) -> None:
    del text

  def close(self) -> None:
    pass


def bar(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True):
  """A progress object with `update(n)`, `set_postfix_str(s)` and `close()`."""
  if not enabled:
    return _Off()
  if sys.stderr.isatty():
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=False)
  return Lines(total, desc, unit)


def iterate(items: Iterable[T], desc: str, *, enabled: bool = True,
            total: int | None = None) -> Iterator[tuple[T, object]]:
  """Yields `(item, bar)` for each item, counting it once it is done."""
  items = list(items) if total is None else items
  progress = bar(len(items) if total is None else total, desc, enabled=enabled)
  try:
    for item in items:
      yield item, progress
      progress.update(1)
  finally:
    progress.close()


@contextlib.contextmanager
def counting(total: int | None, desc: str, *, enabled: bool = True,
             unit: str = "img") -> Iterator[Callable[[int], None]]:
  """Yields `on_batch(n)` that advances a `bar` of `total`, closed at the end."""
  progress = bar(total, desc, unit=unit, enabled=enabled)
  try:
    yield progress.update
  finally:
    progress.close()

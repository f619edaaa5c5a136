"""Progress of the long loops (SFT steps, reward-model steps, PPO iterations), for whoever watches.

A trainer iterates with `tracked(...)` instead of a bare tqdm: the terminal bar shows when the
trainer's `progress` flag is on, and the reporter set with `reporting(...)` (if any) hears of every
finished step. A round sets a reporter that records its progress in the registry, where the app's
banner and dashboard read it ("training the first aligned version: SFT 12/39, about 6 min left").
The reporter is a context variable, so trainers need no extra argument and tests see no difference.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


@dataclass(frozen=True)
class StepProgress:
    """Where a loop is: `done` of `total` steps of `what`, `elapsed_s` since it started."""

    what: str
    done: int
    total: int
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        """Time left if the remaining steps take as long as the finished ones did."""
        if self.done <= 0 or self.total <= 0:
            return None
        return self.elapsed_s / self.done * max(0, self.total - self.done)


Reporter = Callable[[StepProgress], None]
_reporter: ContextVar[Reporter | None] = ContextVar("alignloop_progress_reporter", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send every `tracked` loop's progress inside this block to `reporter`."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


class tracked(Generic[T]):  # noqa: N801 - used like tqdm
    """`for x in tracked(range(n), "SFT", show_bar=cfg.progress)`: a tqdm bar (when shown) that also
    reports each finished step. `set_postfix` goes to the bar."""

    def __init__(self, iterable: Iterable[T], what: str, *, total: int | None = None, show_bar: bool = True) -> None:
        self.what = what
        self.total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        self.bar = tqdm(iterable, desc=what, total=self.total, disable=not show_bar)

    def __iter__(self) -> Iterator[T]:
        report = _reporter.get()
        started = time.perf_counter()
        done = 0
        for item in self.bar:
            yield item
            done += 1
            if report is not None:
                report(StepProgress(self.what, done, self.total, time.perf_counter() - started))

    def set_postfix(self, *args, **kwargs) -> None:
        self.bar.set_postfix(*args, **kwargs)

"""Progress bars and human messages, always on stderr so that stdout stays clean for ``--json``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def enabled_by_default() -> bool:
    return not os.environ.get("CNNMOD_NO_PROGRESS")


@contextmanager
def progress_bar(description: str, total: float | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; shows a bar on stderr unless disabled or ``$CNNMOD_NO_PROGRESS`` is set."""
    if not (enabled and enabled_by_default()):
        yield lambda n=1, **fields: None
        return
    if not console.is_terminal:  # a log or a pipe: no live bar, a plain line every tenth of the way
        yield _plain(description, total)
        return
    global _live
    if _live is not None:  # inside another bar: a line of its own in the same display (rich shows one at a time)
        task = _live.add_task(description, total=total, info="")
        try:
            yield _advancer(_live, task)
        finally:
            _live.remove_task(task)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        _live = bar
        try:
            yield _advancer(bar, bar.add_task(description, total=total, info=""))
        finally:
            _live = None


_live: Progress | None = None  # the bar on screen, if any


def _advancer(bar: Progress, task) -> Callable[..., None]:
    def advance(n: float = 1, **fields) -> None:
        info = "  ".join(f"{k} {v}" for k, v in fields.items())
        bar.update(task, advance=n, **({"info": info} if fields else {}))
    return advance


def _plain(description: str, total: float | None) -> Callable[..., None]:
    """``advance`` that says how far it is, in one line each time another tenth of ``total`` is done (without a
    total: every minute), with the last fields given and the seconds so far."""
    started = time.perf_counter()
    state = {"done": 0.0, "said": 0.0, "info": ""}

    def advance(n: float = 1, **fields) -> None:
        state["done"] += n
        if fields:
            state["info"] = "  ".join(f"{k} {v}" for k, v in fields.items())
        elapsed = time.perf_counter() - started
        if total:
            tenth = int(10 * state["done"] / total + 1e-9)  # parts of a unit may not sum to it exactly
            if tenth <= state["said"]:
                return
            state["said"] = tenth
            where = f"{round(state['done'])}/{round(total)} ({100 * state['done'] / total:.0f}%)"  # whole counts
        else:
            if elapsed - state["said"] < 60:
                return
            state["said"] = elapsed
            where = f"{round(state['done'])}"
        say(f"{description}: {where}  {state['info']}  {elapsed:.0f} s".replace("   ", "  "))

    return advance


def say(message: str) -> None:
    """One line for people, on stderr."""
    console.print(message, highlight=False, soft_wrap=True)  # a long path stays on one line in logs

"""Whole sequences see one set of weights (issue 15's hot adapter swap): a model method that runs the
engines several times, such as generate(), holds a SequenceGate shared for its whole run; a refit holds
it exclusively, so it waits for the sequences running on other threads to end, and sequences that start
meanwhile wait for the refit. A generated sequence is then all old weights or all new ones, never a
mix. A refit made on a thread inside its own sequence (a callback of generate()) does not wait: it
applies from that thread's next step, as asked, and is refused (RefitError) while other threads run
sequences. A sequence must not wait for a routed call it starts on another thread: a refit waiting
meanwhile goes first, and waits for the first sequence."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from .errors import RefitError


class SequenceGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sequences: dict[int, int] = {}  # thread id -> nesting depth of its running sequences
        self._writer: int | None = None
        self._writers_waiting = 0

    @contextlib.contextmanager
    def sequence(self) -> Iterator[None]:
        """Held around a sequence (shared with other sequences)."""
        me = threading.get_ident()
        with self._cond:
            if not self._sequences.get(me) and self._writer != me:
                while self._writer is not None or self._writers_waiting:  # a refit waiting goes first
                    self._cond.wait()
            self._sequences[me] = self._sequences.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._sequences[me] -= 1
                if not self._sequences[me]:
                    del self._sequences[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held around a change of weights: no sequence runs on another thread meanwhile."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me or me in self._sequences:  # nested, or from inside this thread's sequence
                others = [t for t in self._sequences if t != me]
                if self._writer != me and others:
                    raise RefitError(
                        f"a refit from inside a generate() (or another method run through the engines) while "
                        f"{len(others)} other thread(s) run one: their sequences would mix the old and new "
                        "weights, and waiting for them here could wait forever; refit outside generate()"
                    )
                reentrant = True
            else:
                reentrant = False
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._sequences:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
        try:
            yield
        finally:
            if not reentrant:
                with self._cond:
                    self._writer = None
                    self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Refits waiting for sequences to end."""
        with self._cond:
            return self._writers_waiting

    @property
    def running(self) -> int:
        """Sequences running now, on all threads."""
        with self._cond:
            return sum(self._sequences.values())

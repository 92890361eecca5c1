"""SIGTERM and SIGHUP handled as Ctrl-C is: raised in the main thread as `Interrupted` (a KeyboardInterrupt), so
every `finally` and `except BaseException` on the way out runs (temporary files removed, old outputs left as
they were), and the CLI exits 128 + the signal number with one line.

    with handle_signals():          # the CLI, around a command; the previous handlers come back afterwards
        ...
    with deferred():                # a few lines that must not be cut in two (a rename and its bookkeeping):
        ...                         # a signal that arrives inside is raised when the block ends

A signal the parent set to be ignored (`nohup` ignores SIGHUP, a background job in a script ignores SIGINT)
stays ignored. Library code never installs handlers; it only sees KeyboardInterrupt.
"""
from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal: `signum` (SIGINT for Ctrl-C), `exit_code` 128 + signum, and `detail`: what the
    interrupted work kept (e.g. 'saved the best epoch so far to X'), for the one line the CLI prints."""

    last: "Interrupted | None" = None  # the latest one raised (Typer turns a KeyboardInterrupt into a bare 130)

    def __init__(self, signum: int = signal.SIGINT, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail = int(signum), detail
        Interrupted.last = self

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @staticmethod
    def of(exc: BaseException, detail: str = "") -> "Interrupted":
        """`exc` (a plain KeyboardInterrupt counts as SIGINT) as an Interrupted carrying `detail`."""
        return Interrupted(getattr(exc, "signum", signal.SIGINT), detail or getattr(exc, "detail", ""))

    def message(self) -> str:
        """The CLI's line: 'ckv: interrupted' (Ctrl-C) or 'ckv: interrupted by SIGTERM', then what was kept."""
        head = "ckv: interrupted" + ("" if self.signum == signal.SIGINT else f" by {self.name}")
        return f"{head}; {self.detail}" if self.detail else head


_state = threading.local()


def _deferring() -> list | None:
    return getattr(_state, "pending", None)


def _raise(signum, frame):
    pending = _deferring()
    if pending is not None:  # inside `deferred()`: keep it for the end of the block
        pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals():
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for s in HANDLED:
        current = signal.getsignal(s)
        if current is signal.SIG_IGN:  # nohup, or a background job: the parent asked for this signal to be ignored
            continue
        old[s] = current
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred():
    """Hold signals (and the `Interrupted` they raise) until the block ends, then raise the first one. Nested
    blocks hold until the outermost ends. Ctrl-C under Python's own handler (no `handle_signals`) is held too."""
    if threading.current_thread() is not threading.main_thread() or _deferring() is not None:
        yield
        return
    _state.pending = []
    sigint = signal.getsignal(signal.SIGINT)
    if sigint is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise)
    try:
        yield
    finally:
        pending, _state.pending = _state.pending, None
        if sigint is signal.default_int_handler:
            signal.signal(signal.SIGINT, sigint)
        if pending:
            raise Interrupted(pending[0])


def pause(label: str) -> None:
    """A test hook, off unless `CKV_PAUSE_AT` is set: when `label` matches that pattern (fnmatch), touch the file
    `CKV_PAUSE_FILE` and sleep (up to 5 minutes, or until the test removes that file) so that a test can send a
    signal at exactly this point
    (tests/test_guard_signals.py). Labels: 'written NAME' (a temporary file complete, before its rename),
    'epoch N' (training, after epoch N)."""
    import os

    want = os.environ.get("CKV_PAUSE_AT")
    if not want or _deferring() is not None:  # never while signals are held: the test could not stop it
        return
    import fnmatch
    import time

    if not fnmatch.fnmatchcase(label, want):
        return
    marker = os.environ.get("CKV_PAUSE_FILE")
    if marker:
        with open(marker, "w") as f:
            f.write(label)
    end = time.monotonic() + 300
    while time.monotonic() < end and (not marker or os.path.exists(marker)):  # the test removes it to go on
        time.sleep(0.02)

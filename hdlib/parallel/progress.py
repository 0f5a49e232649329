"""Progress a person can see while a stage runs, without a bar in the executed notebook.

Inside a stage's kernel (and its grid workers) long work reports its units through a side channel:
with HDLIB_PROGRESS_FILE set (the runner sets it per stage), `Progress("grid cells", total).update()`
appends one short JSON line per report, at most every `every_s` seconds and always at the end; without
it, nothing is written. The runner reads the file while the notebook runs and renders a live line in
the terminal (`ProgressView`): what is running, done/total and an ETA."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ENV = "HDLIB_PROGRESS_FILE"


class Progress:
    """Reports `done` of `total` units of one task (training steps, grid cells, candidates)."""

    def __init__(self, task: str, total: int, unit: str = "", every_s: float = 1.0, start: int = 0):
        self.task, self.total, self.unit, self.every_s = task, int(total), unit, every_s
        self.done, self._last = int(start), 0.0
        self.path = os.environ.get(ENV)
        self._emit(force=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        self._emit(force=self.done >= self.total)

    def set(self, done: int) -> None:
        self.done = int(done)
        self._emit(force=self.done >= self.total)

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.path or (not force and now - self._last < self.every_s):
            return
        self._last = now
        line = json.dumps({"task": self.task, "done": self.done, "total": self.total, "unit": self.unit,
                           "pid": os.getpid(), "t": time.time()})
        with open(self.path, "a") as fh:  # one short line per append: safe across processes
            fh.write(line + "\n")


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete event lines written since `offset` (a half-written last line waits), and the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


def eta_text(first: dict, last: dict) -> str:
    """ETA from the task's first and latest report (rate over that span)."""
    done, total = last["done"] - first["done"], last["total"] - last["done"]
    span = last["t"] - first["t"]
    if done <= 0 or span <= 0 or total <= 0:
        return ""
    s = total * span / done
    return f", ETA {s / 60:.0f} min" if s >= 90 else f", ETA {s:.0f} s"


class ProgressView:
    """Follows a stage's progress file in a thread; renders one live line (in place on a terminal, at
    most every `plain_every_s` seconds elsewhere) and hands every event to `on_event`."""

    def __init__(self, path: Path, prefix: str, on_event=None, stream=None, plain_every_s: float = 30.0):
        self.path, self.prefix, self.on_event = Path(path), prefix, on_event
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.plain_every_s = plain_every_s
        self._stop = threading.Event()
        self._first: dict[str, dict] = {}
        self._printed = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.path.unlink(missing_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        return False

    def _run(self) -> None:
        offset = 0
        while True:
            stopping = self._stop.wait(0.5)
            events, offset = read_events(self.path, offset)
            for e in events:
                self._show(e)
            if stopping:
                return

    def _show(self, e: dict) -> None:
        if self.on_event is not None:
            self.on_event(e)
        first = self._first.setdefault(f"{e['pid']}:{e['task']}", e)
        text = (f"{self.prefix}: {e['task']} {e['done']}/{e['total']}{(' ' + e['unit']) if e['unit'] else ''}"
                f"{eta_text(first, e)}")
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif now - self._printed >= self.plain_every_s or e["done"] >= e["total"]:
            self._printed = now
            self.stream.write(text + "\n")
            self.stream.flush()

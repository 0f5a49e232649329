"""Which config keys a process reads, recorded for the test that keeps each stage's declaration
(hdlib.stages.declarations) complete.

With HDLIB_RECORD_CONFIG_READS=<file> in the environment when hdlib.config is imported (the runner
sets it for a stage's kernel, and grid workers inherit it), every first read of a key of a config
section (`cfg.downstream.seeds` -> `downstream.seeds`) appends that key to the file. Whole-config
copies (`to_dict`, `section_hash`, the saved config.json) are not reads of a stage."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

ENV = "HDLIB_RECORD_CONFIG_READS"
_state = threading.local()
_seen: set[str] = set()


def _paused() -> bool:
    return getattr(_state, "paused", 0) > 0


@contextlib.contextmanager
def not_recorded():
    """Reads inside are not the caller's (a copy of the whole config)."""
    _state.paused = getattr(_state, "paused", 0) + 1
    try:
        yield
    finally:
        _state.paused -= 1


def _record(key: str, path: str) -> None:
    if key in _seen:
        return
    _seen.add(key)
    with open(path, "a") as fh:  # one short line per append: safe across processes
        fh.write(key + "\n")


def install(sections: dict[type, str]) -> None:
    """Record reads of the fields of each section class (`{DownstreamConfig: "downstream", ...}`) when
    the environment asks for it."""
    path = os.environ.get(ENV)
    if not path:
        return
    for cls, section in sections.items():
        fields = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _fields=fields, _section=section, _orig=cls.__getattribute__):
            if name in _fields and not _paused():
                _record(f"{_section}.{name}", path)
            return _orig(self, name)

        cls.__getattribute__ = getattribute


def read_keys(path: str | os.PathLike) -> set[str]:
    """The keys recorded in a file (empty when nothing was read)."""
    try:
        with open(path) as fh:
            return {line.strip() for line in fh if line.strip()}
    except FileNotFoundError:
        return set()


def covered(key: str, declared) -> bool:
    """A key is covered by itself or by its section (`downstream` covers `downstream.seeds`)."""
    return any(key == d or key.startswith(d + ".") for d in declared)

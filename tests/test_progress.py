"""The progress side channel: the kernel writes short events, the runner's view reads and shows them."""

import io
import json
import time

from hdlib.parallel.progress import ENV, Progress, ProgressView, eta_text, read_events


def test_nothing_is_written_without_the_channel(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    p = Progress("training x", 10, "steps")
    p.update(10)
    assert p.path is None and not list(tmp_path.iterdir())


def test_events_are_throttled_but_the_end_always_arrives(monkeypatch, tmp_path):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(ENV, str(path))
    p = Progress("grid cells", 100, "cells", every_s=3600)
    for _ in range(100):
        p.update()
    events, offset = read_events(path)
    assert [e["done"] for e in events] == [0, 100] and offset == path.stat().st_size


def test_a_half_written_line_waits_for_its_end(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"task": "a", "done": 1, "total": 2, "unit": "", "pid": 1, "t": 0.0}) + "\n{\"task\": ")
    events, offset = read_events(path)
    assert len(events) == 1 and offset < path.stat().st_size


def test_eta_comes_from_the_observed_rate():
    first = {"done": 0, "total": 100, "t": 0.0}
    assert eta_text(first, {"done": 50, "total": 100, "t": 10.0}) == ", ETA 10 s"
    assert eta_text(first, {"done": 10, "total": 100, "t": 60.0}) == ", ETA 9 min"
    assert eta_text(first, first) == ""


def test_the_view_shows_events_and_hands_them_on(monkeypatch, tmp_path):
    path = tmp_path / "events.jsonl"
    out, seen = io.StringIO(), []
    with ProgressView(path, "[6/8] 05_downstream", on_event=seen.append, stream=out, plain_every_s=0):
        monkeypatch.setenv(ENV, str(path))
        p = Progress("grid cells", 4, "cells", every_s=0)
        for _ in range(4):
            p.update()
        time.sleep(0.7)
    assert [e["done"] for e in seen] == [0, 1, 2, 3, 4]
    assert "[6/8] 05_downstream: grid cells 4/4 cells" in out.getvalue()

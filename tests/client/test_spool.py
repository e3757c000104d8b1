"""The disk spool: format, bounds, crash tolerance, replay order, offline sync (real HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

from client_hooks import spool as spool_mod
from client_hooks import wire
from client_hooks.sender import Sender
from tests.client.receiver import Receiver

SPEC: dict[str, Any] = {"id": "spool-1", "project": "tests", "name": "spool-1", "config": {},
                        "tags": [], "batch_size": 4, "world_size": 1, "layers": [],
                        "semantics": wire.DEFAULT_SEMANTICS}


class Rec:
    def __init__(self, step: int) -> None:
        self.step = step

    def to_record(self) -> dict[str, Any]:
        return {"step": self.step, "wall_time": 1.0, "loss": float(self.step)}


def body(steps: range) -> bytes:
    return wire.encode_batch([Rec(i).to_record() for i in steps], compress=False)[0]


def drain(sp: spool_mod.Spool) -> list[int]:
    out = []
    while (head := sp.peek()) is not None:
        out += [s["step"] for s in json.loads(head[0])["steps"]]
        sp.pop()
    return out


def test_segments_rotate_replay_in_order_and_are_deleted(tmp_path: Path) -> None:
    sp = spool_mod.Spool(tmp_path / "r", max_bytes=1 << 20, segment_bytes=200)
    assert sp.open() == 0
    sp.write_run(SPEC)
    for i in range(0, 60, 3):
        assert sp.append(body(range(i, i + 3)), 3) == 0
    assert sp.pending == 60
    assert len(list((tmp_path / "r").glob("seg-*.jsonl"))) > 2  # rotated
    lines = (tmp_path / "r" / "seg-00000001.jsonl").read_bytes().splitlines()
    assert json.loads(lines[0]) == {"wire_version": 1, "steps": [Rec(i).to_record()
                                                                  for i in range(3)]}
    assert drain(sp) == list(range(60))
    assert sp.pending == 0 and not list((tmp_path / "r").glob("seg-*"))
    sp.close(remove_if_empty=True)
    assert not (tmp_path / "r").exists()


def test_over_the_limit_drops_oldest_and_counts(tmp_path: Path) -> None:
    one = len(body(range(0, 5))) + 1
    sp = spool_mod.Spool(tmp_path, max_bytes=10 * one, segment_bytes=2 * one)
    sp.open()
    dropped = sum(sp.append(body(range(i, i + 5)), 5) for i in range(0, 200, 5))
    assert dropped == sp.dropped > 0 and sp.pending + sp.dropped == 200
    assert sum(p.stat().st_size for p in tmp_path.glob("seg-*")) <= 10 * one
    steps = drain(sp)
    assert steps == list(range(200 - len(steps), 200))  # the newest survive, in order
    sp.close()


def test_torn_last_line_and_reopen(tmp_path: Path) -> None:
    sp = spool_mod.Spool(tmp_path)
    sp.open()
    sp.append(body(range(0, 4)), 4)
    sp.append(body(range(4, 8)), 4)
    sp.close()
    with open(tmp_path / "seg-00000001.jsonl", "ab") as f:
        f.write(body(range(8, 12))[:20])  # a write cut short by a crash
    again = spool_mod.Spool(tmp_path)
    assert again.open() == 8
    again.append(body(range(12, 14)), 2)  # goes to a new segment, after the old one
    assert drain(again) == [*range(8), 12, 13]
    again.close()


def test_a_second_process_cannot_take_the_spool(tmp_path: Path) -> None:
    sp = spool_mod.Spool(tmp_path)
    sp.open()
    code = ("import sys; from client_hooks.spool import Spool, SpoolBusy\n"
            f"try: Spool({str(tmp_path)!r}).open()\nexcept SpoolBusy: sys.exit(3)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    sp.close()


def test_spool_module_does_not_import_torch() -> None:
    code = "import client_hooks.spool, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_outage_spills_to_disk_and_replays_in_order(receiver: Receiver, tmp_path: Path) -> None:
    receiver.step_answers.extend([(503, {"error": "Unavailable", "detail": "db down"})] * 3)
    sender = Sender(receiver.url, "spool-1", SPEC, flush_interval=0.02, max_batch=7,
                    spool_dir=tmp_path, spool_after=0.0)
    for i in range(30):
        sender.put(Rec(i))
    deadline = time.monotonic() + 5
    while sender.stats["spooled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.stats["spooled"] > 0  # the outage moved data to disk
    assert (tmp_path / "spool-1" / "run.json").is_file()
    for i in range(30, 50):
        sender.put(Rec(i))
    assert sender.flush(timeout=10)
    stats = sender.stats
    sender.close()
    assert (stats["sent"], stats["spooled"], stats["pending"], stats["dropped"]) == (50, 0, 0, 0)
    assert [s["step"] for s in receiver.steps] == list(range(50))  # replayed in order, once
    assert not (tmp_path / "spool-1").exists()  # delivered: nothing left behind


def test_closing_while_down_keeps_everything_for_the_next_process(receiver: Receiver,
                                                                  tmp_path: Path) -> None:
    dead = Sender("http://127.0.0.1:9", "spool-1", SPEC, flush_interval=0.02,
                  spool_dir=tmp_path, spool_after=0.0)
    for i in range(25):
        dead.put(Rec(i))
    dead.close(timeout=0.5)
    assert dead.stats["spooled"] == 25 and dead.stats["pending"] == 0
    # A resumed run (same id, same spool) replays the old steps before its own.
    sender = Sender(receiver.url, "spool-1", SPEC, flush_interval=0.02, spool_dir=tmp_path)
    for i in range(25, 40):
        sender.put(Rec(i))
    assert sender.flush(timeout=10)
    sender.close()
    assert sender.stats["recovered"] == 25 and sender.stats["sent"] == 40
    assert [s["step"] for s in receiver.steps] == list(range(40))


def test_offline_then_sync_uploads_once(receiver: Receiver, tmp_path: Path) -> None:
    sender = Sender(None, "spool-1", SPEC, flush_interval=0.02, max_batch=8, spool_dir=tmp_path)
    for i in range(30):
        sender.put(Rec(i))
    assert sender.flush(timeout=5)  # offline: flushed means on disk
    sender.close()
    assert sender.stats["spooled"] == 30 and receiver.log == []
    lines: list[str] = []
    assert spool_mod.sync(tmp_path, receiver.url, out=lines.append) == 0
    assert [s["step"] for s in receiver.steps] == list(range(30))
    assert receiver.runs == [json.loads(wire.dumps(SPEC))]
    assert "synced 30 steps in 4 batches" in lines[-1]
    # The writing process closed normally: once uploaded, the run is marked finished, once.
    assert receiver.finished == ["spool-1"] and not (tmp_path / "spool-1" / "closed").exists()
    lines.clear()
    assert spool_mod.sync(tmp_path / "spool-1", receiver.url, out=lines.append) == 0
    assert "nothing to upload" in lines[0] and len(receiver.steps) == 30
    assert receiver.finished == ["spool-1"]


def test_a_resumed_run_is_not_finished_by_an_old_spool(receiver: Receiver,
                                                       tmp_path: Path) -> None:
    dead = Sender("http://127.0.0.1:9", "spool-1", SPEC, flush_interval=0.02,
                  spool_dir=tmp_path, spool_after=0.0)
    for i in range(5):
        dead.put(Rec(i))
    dead.close(timeout=0.5)
    assert (tmp_path / "spool-1" / "closed").exists()
    # A new process takes the run up again (offline) and dies without close().
    crash = f"""
import os
from client_hooks.sender import Sender
from tests.client.test_spool import SPEC, Rec
again = Sender(None, "spool-1", SPEC, flush_interval=0.02, spool_dir={str(tmp_path)!r})
again.put(Rec(5))
assert again.flush(timeout=5)  # offline: flushed means on disk
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", crash], check=True, timeout=60)
    assert not (tmp_path / "spool-1" / "closed").exists()
    assert spool_mod.sync(tmp_path, receiver.url, out=lambda _: None) == 0
    assert [s["step"] for s in receiver.steps] == list(range(6)) and receiver.finished == []


def test_sync_keeps_what_the_collector_refused(receiver: Receiver, tmp_path: Path) -> None:
    sp = spool_mod.Spool(tmp_path / "spool-1", segment_bytes=1)  # one batch per segment
    sp.open()
    sp.write_run(SPEC)
    sp.append(body(range(0, 5)), 5)
    sp.append(body(range(5, 10)), 5)
    sp.close()
    receiver.step_answers.extend([(200, {}), (422, {"error": "ValidationError",
                                                    "detail": "bad"})])
    lines: list[str] = []
    assert spool_mod.sync(tmp_path, receiver.url, out=lines.append) == 1
    assert any("HTTP 422: ValidationError: bad" in line for line in lines)
    assert receiver.finished == []  # no marker: the writer did not close (crashed)
    again = spool_mod.Spool(tmp_path / "spool-1")
    assert again.open() == 5  # the delivered batch is gone, the refused one kept
    again.close()


def test_only_the_sender_thread_touches_the_disk(tmp_path: Path) -> None:
    threads: set[str] = set()
    real_open, real_append = spool_mod.Spool.open, spool_mod.Spool.append

    def spy_open(self: spool_mod.Spool) -> int:
        threads.add(threading.current_thread().name)
        return real_open(self)

    def spy_append(self: spool_mod.Spool, body: bytes, steps: int) -> int:
        threads.add(threading.current_thread().name)
        return real_append(self, body, steps)

    with mock.patch.object(spool_mod.Spool, "open", spy_open), \
            mock.patch.object(spool_mod.Spool, "append", spy_append):
        sender = Sender("http://127.0.0.1:9", "spool-1", SPEC, flush_interval=0.01,
                        spool_dir=tmp_path, spool_after=0.0)
        for i in range(300):
            sender.put(Rec(i))
            time.sleep(0.0005)
        sender.close(timeout=0.2)
    assert sender.stats["spooled"] == 300
    assert threads == {"gradsentry-sender"}


def test_sender_counts_what_the_spool_limit_drops(tmp_path: Path) -> None:
    sender = Sender("http://127.0.0.1:9", "spool-1", SPEC, flush_interval=0.01, max_batch=10,
                    spool_dir=tmp_path, spool_after=0.0, spool_max_bytes=2000)
    for i in range(200):
        sender.put(Rec(i))
        time.sleep(0.0005)
    sender.close(timeout=0.2)
    stats = sender.stats
    assert stats["dropped"] > 0 and stats["spooled"] + stats["dropped"] == 200
    assert sum(p.stat().st_size for p in (tmp_path / "spool-1").glob("seg-*")) <= 2000
    sp = spool_mod.Spool(tmp_path / "spool-1")
    assert sp.open() == stats["spooled"]
    steps = drain(sp)
    sp.close()
    assert steps == list(range(200 - len(steps), 200))  # the newest kept, in order

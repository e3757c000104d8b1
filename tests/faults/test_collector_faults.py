"""Every step reaches the database exactly once although the collector process is down at
start, SIGKILLed mid-run, or away for a while; training does not slow down meanwhile."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tests.client import models
from tests.conftest import new_run_id
from tests.faults.conftest import CollectorProcess, stored_steps, train_step, wait_for, watch


def test_collector_down_at_start(collector_process: CollectorProcess, tmp_path: Path) -> None:
    model, opt = models.make()
    run_id = new_run_id("down")
    mon = watch(model, opt, collector_process.url, run_id, tmp_path, spool_after=0.2)
    for i in range(60):
        train_step(mon, model, opt, i)
    wait_for(lambda: mon.stats["spooled"] == 60)  # nobody answers: all of it went to disk
    assert list((tmp_path / run_id).glob("seg-*.jsonl"))
    collector_process.start()
    for i in range(60, 100):
        train_step(mon, model, opt, i)
    assert mon.flush(timeout=30)
    mon.close()
    assert (mon.stats["sent"], mon.stats["spooled"], mon.stats["dropped"]) == (100, 0, 0)
    assert stored_steps(collector_process.url, run_id) == (100, list(range(100)))
    assert not (tmp_path / run_id).exists()


def test_collector_killed_mid_run(collector_process: CollectorProcess, tmp_path: Path) -> None:
    collector_process.start()
    model, opt = models.make()
    run_id = new_run_id("kill")
    mon = watch(model, opt, collector_process.url, run_id, tmp_path, spool_after=0.2)
    for i in range(50):
        train_step(mon, model, opt, i)
    assert mon.flush(timeout=30)
    for i in range(50, 70):
        train_step(mon, model, opt, i)
    collector_process.kill()  # possibly while a batch is in flight
    for i in range(70, 120):
        train_step(mon, model, opt, i)
    wait_for(lambda: mon.stats["spooled"] > 0)
    collector_process.start()  # same port, same database
    for i in range(120, 150):
        train_step(mon, model, opt, i)
    assert mon.flush(timeout=30)
    mon.close()
    stats = mon.stats
    assert (stats["sent"] - stats["recovered"], stats["spooled"], stats["dropped"]) == (150, 0, 0)
    assert stored_steps(collector_process.url, run_id) == (150, list(range(150)))


def test_step_time_does_not_suffer_while_down(database_urls: dict[str, str],
                                              tmp_path: Path) -> None:
    collector = CollectorProcess(database_urls["sqlite"])
    collector.start()
    try:
        model, opt = models.make()
        run_id = new_run_id("timing")
        mon = watch(model, opt, collector.url, run_id, tmp_path, spool_after=0.1)

        def timed(first: int, n: int) -> list[float]:
            out = []
            for i in range(first, first + n):
                start = time.perf_counter()
                train_step(mon, model, opt, i)
                out.append(time.perf_counter() - start)
                time.sleep(0.002)  # leave the sender room to work, as a real step would
            return out

        timed(0, 20)  # warm-up
        up = timed(20, 200)
        collector.kill()
        down = timed(220, 200)
        assert mon.stats["spooled"] > 0  # the sender was busy spooling meanwhile
        up_median, down_median = statistics.median(up), statistics.median(down)
        assert down_median <= 1.5 * up_median + 0.002, (up_median, down_median)
        mon.close(timeout=0.5)
        stats = mon.stats  # everything is delivered or on disk (the tests above replay it)
        assert (stats["sent"] + stats["spooled"], stats["dropped"]) == (420, 0)
    finally:
        collector.stop()

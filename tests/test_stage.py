"""The ordered background stage behind prediction's blend and write threads."""

from __future__ import annotations

import threading
import time

import pytest

from codemae_cli.infer.stage import Stage


def test_calls_run_in_order_in_one_other_thread():
    stage, done, threads = Stage("codemae-test", depth=3), [], set()

    def work(i):
        threads.add(threading.current_thread().name)
        done.append(i)

    for i in range(20):
        stage.submit(work, i)
    stage.close()
    assert done == list(range(20))
    assert len(threads) == 1 and threads.pop().startswith("codemae-test")


def test_submit_waits_while_depth_calls_are_pending():
    stage, release, started = Stage("codemae-test", depth=2), threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)

    stage.submit(slow)
    started.wait(5)
    stage.submit(lambda: None)  # one running + one waiting: the bound
    blocked = threading.Thread(target=stage.submit, args=(lambda: None,))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()  # a third call waits for the first to finish
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    stage.close()


def test_the_first_error_is_raised_and_later_calls_are_skipped():
    stage, done = Stage("codemae-test", depth=4), []

    def fail(msg):
        raise ValueError(msg)

    stage.submit(done.append, 1)
    stage.submit(fail, "first")
    stage.submit(fail, "second")
    stage.submit(done.append, 2)  # after a failure: would work on a broken state, so skipped
    with pytest.raises(ValueError, match="first"):
        stage.drain()
    stage.abort()
    assert done == [1]


def test_an_error_surfaces_on_the_next_submit():
    stage = Stage("codemae-test", depth=1)
    stage.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        stage.submit(lambda: None)
    stage.abort()


def test_abort_drops_waiting_calls_and_ends_the_thread():
    stage, release, done = Stage("codemae-abort", depth=5), threading.Event(), []
    stage.submit(release.wait, 5)
    for i in range(3):
        stage.submit(done.append, i)
    release.set()
    stage.abort()
    assert not [t for t in threading.enumerate() if t.name.startswith("codemae-abort")]

"""The model scheduler: clicks before batches before training, and long work stepping aside between
forward passes. Orchestrated with events, never with timing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from backend.runtime.scheduler import BACKGROUND, BATCH, INTERACTIVE, ModelScheduler
from osprey.runtime.steps import step_boundary


def start(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def wait_for_waiters(scheduler: ModelScheduler, n: int) -> None:
    for _ in range(10_000):
        if len(scheduler.stats()["waiting"]) >= n:
            return
        threading.Event().wait(0.001)
    raise AssertionError(f"expected {n} waiters, have {scheduler.stats()['waiting']}")


def test_waiting_work_gets_the_model_by_priority_then_arrival():
    scheduler, order, release = ModelScheduler(), [], threading.Event()

    def hold():
        with scheduler.session(BACKGROUND):
            release.wait(10)

    def work(name, priority):
        with scheduler.session(priority):
            order.append(name)

    holder = start(hold)
    wait_for_waiters(scheduler, 0)
    while scheduler.stats()["holder"] is None:
        threading.Event().wait(0.001)
    threads = []
    for name, priority in [
        ("train", BACKGROUND),
        ("batch-1", BATCH),
        ("click", INTERACTIVE),
        ("batch-2", BATCH),
    ]:
        threads.append(start(work, name, priority))
        wait_for_waiters(scheduler, len(threads))
    release.set()
    for thread in (holder, *threads):
        thread.join(10)
    assert order == ["click", "batch-1", "batch-2", "train"]
    assert scheduler.stats()["sessions"] == {"interactive": 1, "batch": 2, "background": 2}


def test_batch_work_hands_the_model_to_a_click_at_the_next_step_and_takes_it_back():
    scheduler, order = ModelScheduler(), []
    resumed, click_waiting = [], threading.Event()

    def batch():
        with scheduler.session(BATCH, on_resume=lambda: resumed.append(True)):
            order.append("batch step 1")
            click_waiting.wait(10)
            wait_for_waiters(scheduler, 1)
            step_boundary()  # what FastRunner calls between forward passes
            order.append("batch step 2")
            step_boundary()  # nobody waiting now: no hand-over
            order.append("batch step 3")

    def click():
        click_waiting.set()
        with scheduler.session(INTERACTIVE):
            order.append("click")

    runner = start(batch)
    while scheduler.stats()["holder"] != "batch":
        threading.Event().wait(0.001)
    clicker = start(click)
    runner.join(10)
    clicker.join(10)
    assert order == ["batch step 1", "click", "batch step 2", "batch step 3"]
    assert resumed == [True] and scheduler.stats()["handovers"] == 1


def test_interactive_work_never_steps_aside_and_outside_a_session_the_hook_is_inert():
    scheduler = ModelScheduler()
    step_boundary()  # no session in this thread: nothing happens
    with scheduler.session(INTERACTIVE):
        step_boundary()
    assert scheduler.stats()["handovers"] == 0
    with pytest.raises(ValueError, match="priority"):
        with scheduler.session(7):
            pass


def test_a_click_during_a_real_batch_runs_between_its_forward_passes_with_unchanged_answers(
    tiny_osprey, scene
):
    from osprey.inference.fields import LabelRequest

    request = LabelRequest(categories=("cat", "dog"), caption=True, description=True, max_caption_tokens=6,
                           max_description_tokens=6)  # fmt: skip
    image, masks = scene["image"], scene["masks"]
    other = np.ascontiguousarray(image[::-1])
    items = [(image, masks[:2]), (other, [m[::-1] for m in masks[2:]])]
    alone_batch = tiny_osprey.label_many(items, request)
    alone_click = tiny_osprey.label(image, masks[3:], request)
    scheduler, events, out = ModelScheduler(), [], {}

    def batch():
        with scheduler.session(BATCH):
            clicker = start(click)
            wait_for_waiters(scheduler, 1)  # the click waits: the batch meets it at its first block
            out["batch"] = tiny_osprey.label_many(items, request)
            events.append("batch done")
        clicker.join(60)

    def click():
        with scheduler.session(INTERACTIVE):
            out["click"] = tiny_osprey.label(image, masks[3:], request)
            events.append("click done")

    runner = start(batch)
    runner.join(120)
    assert events == ["click done", "batch done"]  # the click did not wait for the whole batch
    assert scheduler.stats()["handovers"] == 1
    for got, want in zip([*out["batch"], out["click"]], [*alone_batch, alone_click], strict=True):
        assert [(a.category.label, a.caption, a.description) for a in got] == [
            (b.category.label, b.caption, b.description) for b in want
        ]
        for a, b in zip(got, want, strict=True):
            assert a.category.scores == pytest.approx(b.category.scores, abs=1e-5)


def test_work_waiting_on_an_encode_that_stepped_aside_lets_it_finish_instead_of_deadlocking(tiny_models):
    """The batch steps aside inside SAM's encoder (holding the encoder lock and the image's in-flight
    entry); the click wants the same image's embedding: it lets go of the model while it waits, the
    batch finishes the encode, and both get the one embedding."""
    from osprey.sam.embedding import SamImageEmbedder

    embedder = SamImageEmbedder(sam=tiny_models.everything.embedder.sam, model_id="scheduler-test")
    image = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    scheduler, got, events = ModelScheduler(), {}, []

    def click():
        with scheduler.session(INTERACTIVE):
            got["click"] = embedder.embed(image)
            events.append("click done")

    def batch():
        with scheduler.session(BATCH):
            clicker = start(click)
            wait_for_waiters(
                scheduler, 1
            )  # the click waits: the batch steps aside at the encoder's first block
            got["batch"] = embedder.embed(image)
            events.append("batch done")
        clicker.join(60)

    runner = start(batch)
    runner.join(60)
    assert not runner.is_alive(), "deadlock: the click and the batch wait for each other"
    assert events == ["batch done", "click done"]
    assert got["click"] is got["batch"]  # one encode, shared
    stats = scheduler.stats()
    assert stats["handovers"] == 1 and stats["pauses"] == 1
    assert embedder.cache.stats()["misses"] == 1


def test_request_times_split_a_request_into_model_waiting_and_the_rest():
    from backend.service.overhead import RequestTimes

    scheduler = ModelScheduler()
    times = RequestTimes(scheduler)
    release, holding = threading.Event(), threading.Event()

    def batch():
        with scheduler.session(BATCH):
            holding.set()
            release.wait(10)

    holder = start(batch)
    holding.wait(10)
    with times.measure() as timing:
        timing["kind"] = "interactive"
        start(lambda: (wait_for_waiters(scheduler, 1), release.set()))  # let go once this request waits
        with scheduler.session(INTERACTIVE):
            sum(range(100_000))  # "model" work
        sum(range(100_000))  # the backend's own work
    holder.join(10)
    row = times.stats()["interactive"]
    assert row["requests"] == 1 and row["wait_s"] > 0 and row["model_s"] > 0 and row["other_s"] > 0
    assert row["total_s"] == pytest.approx(row["wait_s"] + row["model_s"] + row["other_s"], abs=2e-3)
    assert "batch" not in times.stats()  # the batch's own time belongs to its request, not this one

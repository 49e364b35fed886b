"""One writer per (task, model version): claims in the store with a lease, writers that share the store
never both write a task, and writers that do not share it converge on the prediction with the lowest
id. Against the fault-injecting Label Studio over real HTTP."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from lsapi_server import LEGACY_KEY
from test_faults import CONFIG, FixedPredictor

from backend.labelstudio.api import LabelStudioClient
from backend.labelstudio.schema import parse_label_config
from backend.predict.tasks import task_id
from backend.prelabel import claims as claims_module
from backend.prelabel.claims import BATCH_WRITER, Claimer, PrelabelClaims, converge, writer_id
from backend.prelabel.engine import prelabel

VERSION = "v-test"


class SlowPredictor(FixedPredictor):
    """One fixed region per task, ``seconds`` per batch (so two writers overlap)."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.predicted: list[int] = []
        self._lock = threading.Lock()

    def predict(self, tasks, schema, head=None):
        time.sleep(self.seconds)
        with self._lock:
            self.predicted += [task_id(t) for t in tasks]
        return super().predict(tasks, schema, head)


@pytest.fixture
def store(tmp_path):
    claims = PrelabelClaims(tmp_path / "training.sqlite3")
    yield claims
    claims.close()


def client_of(ls) -> LabelStudioClient:
    return LabelStudioClient(url=ls.url, api_key=LEGACY_KEY)


def writer(ls, predictor, claimer, tasks, summaries, **kwargs):
    client = client_of(ls)
    summaries.append(prelabel(
        tasks, predictor=predictor, schema=parse_label_config(CONFIG), project=7, model_version=VERSION,
        sink=client, chunk_tasks=4, sleep=lambda s: None, claimer=claimer, **kwargs,
    ))  # fmt: skip


def race(ls, predictors, claimers) -> list:
    """Two writers at once on the same task list, read before either wrote; their summaries."""
    tasks, summaries = list(client_of(ls).tasks(7)), []
    threads = [
        threading.Thread(target=writer, args=(ls, predictor, claimer, [dict(t) for t in tasks], summaries))
        for predictor, claimer in zip(predictors, claimers, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summaries


def one_each(ls) -> bool:
    return all(len(ls.predictions_of(t, VERSION)) == 1 for t in ls.state.tasks)


def test_a_claim_is_exclusive_until_released_or_its_lease_runs_out(store, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(claims_module.time, "time", lambda: now[0])
    assert store.claim("7", VERSION, [1, 2, 3], owner="a", lease_s=60) == {1, 2, 3}
    assert store.claim("7", VERSION, [2, 3, 4], owner="b", lease_s=60) == {4}
    assert store.claim("7", "other-version", [2], owner="b", lease_s=60) == {2}  # per version
    assert store.claim("7", VERSION, [1], owner="a", lease_s=60) == {1}  # a writer renews its own
    store.release("7", VERSION, [2], owner="b")  # not b's: nothing happens
    assert store.claim("7", VERSION, [2], owner="b", lease_s=60) == set()
    store.release("7", VERSION, [2], owner="a")
    assert store.claim("7", VERSION, [2], owner="b", lease_s=60) == {2}
    now[0] += 61  # a's lease ran out (a crashed): its tasks are taken over
    assert store.claim("7", VERSION, [1, 3], owner="b", lease_s=60) == {1, 3}
    assert store.held() == {"7": 2}  # the others ran out too


def test_a_batch_predict_is_answered_again_but_its_hold_keeps_the_other_writers_away(store):
    """Label Studio asking twice for a task it was just answered (Retrieve Predictions run again) gets an
    answer; a deferred job or the command, meanwhile, is still kept off the task."""
    first, second = writer_id(BATCH_WRITER), writer_id(BATCH_WRITER)
    assert store.claim("7", VERSION, [1, 2], owner=first, lease_s=60) == {1, 2}
    store.hold("7", VERSION, [1, 2], owner=first, seconds=120)  # answered: Label Studio stores it meanwhile
    assert store.claim("7", VERSION, [1], owner=second, lease_s=60) == {1}
    assert store.claim("7", VERSION, [1, 2], owner=writer_id("prelabel"), lease_s=60) == set()


def test_writers_sharing_the_store_never_both_write_a_task(ls, store):
    """The deferred job and the command at once, on the same tasks: each task predicted and written once."""
    predictors = [SlowPredictor(), SlowPredictor()]
    summaries = race(ls, predictors, [Claimer(store, "7", VERSION, f"w{n}") for n in range(2)])
    assert one_each(ls)
    assert sorted(predictors[0].predicted + predictors[1].predicted) == sorted(ls.state.tasks)
    assert sum(s.predicted for s in summaries) == 40 and sum(s.duplicates for s in summaries) == 0
    assert store.held() == {}  # every claim given back


def test_writers_without_a_shared_store_converge_on_one_prediction(ls, tmp_path):
    """The command on another machine: no shared claims; duplicates written meanwhile are deleted by
    the same rule in both writers, keeping the lowest id."""
    stores = [PrelabelClaims(tmp_path / f"machine-{n}.sqlite3") for n in range(2)]
    claimers = [Claimer(stores[n], "7", VERSION, f"w{n}") for n in range(2)]
    summaries = race(ls, [SlowPredictor(0.05), SlowPredictor(0.05)], claimers)
    assert one_each(ls)
    assert sum(s.predicted for s in summaries) >= 40


def test_converge_keeps_the_lowest_id_and_drops_empty_ones(ls):
    client = client_of(ls)
    for result in ([{"id": "x"}], [], [{"id": "y"}]):
        client.create_predictions(
            7, [{"task": 100, "result": result, "score": 0.1, "model_version": VERSION}]
        )
    client.create_predictions(
        7, [{"task": 100, "result": [{"id": "z"}], "score": 0.1, "model_version": "old"}]
    )
    lowest = min(p["id"] for p in ls.predictions_of(100, VERSION))
    found = converge(client, 7, [100, 101], VERSION)
    assert found.done == {100} and (found.duplicates, found.empty) == (1, 1)
    assert [p["id"] for p in ls.predictions_of(100, VERSION)] == [lowest]
    assert len(ls.predictions_of(100, "old")) == 1  # another version is not ours to touch


def test_a_writer_that_fails_gives_its_claims_back(ls, store):
    client = LabelStudioClient(url=ls.url, api_key="revoked")  # every call refused: the run stops
    with pytest.raises(Exception, match="HTTP 401"):
        prelabel(
            [{"id": 100 + i, "data": {"image": "x"}, "predictions": []} for i in range(8)],
            predictor=SlowPredictor(0), schema=parse_label_config(CONFIG), project=7, model_version=VERSION,
            sink=client, claimer=Claimer(store, "7", VERSION, "crashing"), sleep=lambda s: None,
        )  # fmt: skip
    assert store.held() == {}


def test_the_claims_of_a_killed_process_of_this_host_are_taken_over_at_once(store):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    owner = f"{socket.gethostname()}:{int(dead.stdout)}:prelabel:0123abcd"  # a writer_id of an ended process
    assert store.claim("7", VERSION, [1, 2], owner=owner, lease_s=900) == {1, 2}
    alive = writer_id("prelabel")  # this process: alive, its claims hold
    assert store.claim("7", VERSION, [3], owner=alive, lease_s=900) == {3}
    assert store.claim("7", VERSION, [1, 2, 3], owner="elsewhere:1:x:y", lease_s=900) == {1, 2}

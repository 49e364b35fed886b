"""``osprey-label prelabel --ray`` on a local Ray (2 CPUs, 127.0.0.1, started and stopped here) against a
Label Studio over real HTTP (``lsapi_server``), tiny models: every task once, the in-process engine's
answers, a broken image reported while the rest succeed, other writers' claims respected, and a model
actor killed mid-run retried with nothing lost or written twice."""

from __future__ import annotations

import sys
import time

import pytest
from lsapi_server import LEGACY_KEY

import backend.cli.prelabel as prelabel_cli
import backend.prelabel.ray_engine as ray_engine
from backend.cli import main
from backend.prelabel.claims import PrelabelClaims
from backend.prelabel.ray_engine import CRASH_TEST_ENV, TaskFeed

ray = pytest.importorskip("ray")

VERSION = "tiny+sam-tiny-untrained"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture
def command(ls, monkeypatch, tmp_path):
    for name, value in {
        "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": LEGACY_KEY, "MODEL_DIR": str(tmp_path / "models"),
        "OSPREY_MODEL": "tiny", "SAM_MODEL": "tiny", "OSPREY_DEVICE": "cpu", "OSPREY_MAX_CAPTION_TOKENS": "2",
        "OSPREY_MAX_DESCRIPTION_TOKENS": "2", "OSPREY_POINTS_PER_SIDE": "4", "OSPREY_MAX_MASKS": "1",
        "OSPREY_PRED_IOU_THRESH": "0", "OSPREY_STABILITY_SCORE_THRESH": "0", "OSPREY_MIN_MASK_AREA": "0",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(CRASH_TEST_ENV, raising=False)
    return lambda *argv: main(["prelabel", "--quiet", "--project", "7", *argv])


def keep_tasks(ls, n: int) -> list[int]:
    for task in list(ls.state.tasks)[n:]:
        del ls.state.tasks[task]
    return sorted(ls.state.tasks)


def stripped(ls, task: int) -> list[list[dict]]:
    """A task's predictions of the version, without the random region ids, scores to 4 places."""
    return [
        [{**{k: v for k, v in item.items() if k != "id"}, "score": round(item.get("score") or 0, 4)}
         for item in prediction["result"]]
        for prediction in ls.predictions_of(task, VERSION)
    ]  # fmt: skip


def test_ray_writes_the_in_process_answers_once_and_reports_a_broken_image(
    local_ray, ls, command, tmp_path, capsys, monkeypatch
):
    import backend.runtime.runtime as runtime_module

    def no_models_here(*args, **kwargs):  # the driver: the models load in the actors, never here
        raise AssertionError("prelabel --ray loaded the models in the driver")

    ids = keep_tasks(ls, 9)
    ls.state.tasks[ids[4]]["data"]["image"] = "/data/upload/7/deleted.png"
    other = PrelabelClaims(tmp_path / "models" / "training.sqlite3")  # a running job holds two tasks
    assert other.claim("7", VERSION, ids[:2], owner="host:1:job:x", lease_s=600) == set(ids[:2])

    with monkeypatch.context() as patched:
        patched.setattr(runtime_module, "load_models", no_models_here)
        assert command("--ray", "--batch-tasks", "2", "--chunk-tasks", "3", "--retries", "0") == 1
    out = capsys.readouterr().out
    assert "predicted                      6" in out and "left to another writer         2" in out, out
    assert "failed                         1" in out and f"tasks {ids[4]}" in out and "404" in out, out
    assert ls.predictions_of(ids[4]) == [] and all(ls.predictions_of(t) == [] for t in ids[:2])
    on_ray = {t: stripped(ls, t) for t in ids[2:] if t != ids[4]}
    assert all(len(found) == 1 for found in on_ray.values())
    assert other.held() == {"7": 2}  # ours given back, the other writer's kept

    for task in on_ray:  # the same tasks again, in this process
        ls.state.tasks[task]["predictions"] = []
    assert command("--retries", "0") == 1
    assert {t: stripped(ls, t) for t in on_ray} == on_ray
    other.release("7", VERSION, ids[:2], owner="host:1:job:x")


def test_a_model_actor_killed_mid_run_is_retried_and_nothing_is_lost_or_doubled(
    local_ray, ls, command, monkeypatch, tmp_path, capsys
):
    ids = keep_tasks(ls, 10)
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_TEST_ENV, f"2:{marker}")
    assert command("--ray", "--batch-tasks", "2", "--chunk-tasks", "2") == 0
    assert marker.exists()  # an actor did exit on its second batch
    out = capsys.readouterr().out
    assert "predicted                     10" in out and "failed                         0" in out, out
    assert all(len(ls.predictions_of(t, VERSION)) == 1 for t in ids)
    assert command("--ray") == 0  # a rerun writes nothing
    assert "skipped (already done)        10" in capsys.readouterr().out
    assert all(len(ls.predictions_of(t, VERSION)) == 1 for t in ids)


def test_the_feed_holds_a_few_batches_ends_after_the_last_and_gives_back_what_nobody_took(local_ray):
    feed = ray.remote(TaskFeed).remote(2)
    assert ray.get(feed.put.remote([1, 2])) is True and ray.get(feed.put.remote([3])) is True  # in order
    third = feed.put.remote([4, 5])
    assert ray.wait([third], timeout=0.5)[1] == [third]  # two batches wait: the listing waits too
    assert ray.get(feed.take.remote()) == [1, 2]
    assert ray.get(third) is True
    waiting = feed.take.remote(), feed.take.remote(), feed.take.remote()
    assert sorted(ray.get(list(waiting[:2]))) == [[3], [4, 5]]  # takers may be served in any order
    assert ray.wait([waiting[2]], timeout=0.5)[1] == [waiting[2]]  # nothing yet, not ended: it waits
    ray.get(feed.end.remote())
    assert ray.get(waiting[2]) is None  # ended and empty: a slot with no batch
    stopped = ray.remote(TaskFeed).remote(4)
    ray.get(stopped.put.remote([6]))
    ray.get(stopped.put.remote([7]))
    assert ray.get(stopped.stop.remote()) == [[6], [7]]  # never taken: back to the driver
    assert ray.get(stopped.put.remote([8])) is False and ray.get(stopped.take.remote()) is None


def test_the_pipeline_starts_before_the_listing_ends(local_ray, ls, command, monkeypatch, tmp_path, capsys):
    ids = keep_tasks(ls, 6)
    claims = PrelabelClaims(tmp_path / "models" / "training.sqlite3")
    listed = prelabel_cli._task_stream
    waited: dict[str, bool] = {}

    def gated(client, args, **kwargs):
        stream, total = listed(client, args, **kwargs)

        def tasks():  # the last task is listed only once a CPU task has claimed a batch of the first ones
            for n, task in enumerate(stream):
                if n == len(ids) - 1:
                    deadline = time.monotonic() + 120
                    while not claims.held() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    waited["claimed first"] = bool(claims.held())
                yield task

        return tasks(), total

    monkeypatch.setattr(prelabel_cli, "_task_stream", gated)
    assert command("--ray", "--batch-tasks", "2", "--chunk-tasks", "2") == 0
    assert waited == {"claimed first": True}
    assert "predicted                      6" in capsys.readouterr().out
    assert all(len(ls.predictions_of(t, VERSION)) == 1 for t in ids)
    assert claims.held() == {}


def test_tasks_beyond_the_count_the_run_started_with_go_to_the_next_round(
    local_ray, ls, command, monkeypatch, capsys
):
    ids = keep_tasks(ls, 6)
    listed = prelabel_cli._task_stream
    monkeypatch.setattr(
        prelabel_cli, "_task_stream", lambda client, args, **kw: (listed(client, args, **kw)[0], 2)
    )
    monkeypatch.setattr(ray_engine, "FEED_SLACK", 0)  # one slot: one batch of 2 in the streamed round

    assert command("--ray", "--batch-tasks", "2", "--retries", "0") == 1  # no next round: said so
    out = capsys.readouterr().out
    assert "predicted                      2" in out and "failed                         4" in out, out
    assert "not reached in this run" in out
    assert command("--ray", "--batch-tasks", "2") == 0  # the next round takes the rest
    out = capsys.readouterr().out
    assert "predicted                      4" in out and "skipped (already done)         2" in out, out
    assert all(len(ls.predictions_of(t, VERSION)) == 1 for t in ids)


@pytest.mark.parametrize("engine", [["--serial"], [], ["--ray"]], ids=["serial", "pipelined", "ray"])
def test_a_listing_that_fails_midway_writes_what_was_taken_and_says_so_in_one_line(
    local_ray, ls, command, monkeypatch, capsys, engine
):
    from backend.labelstudio.api import LabelStudioAPIError

    ids = keep_tasks(ls, 8)
    listed = prelabel_cli._task_stream

    def failing(client, args, **kwargs):
        stream, total = listed(client, args, **kwargs)

        def tasks():  # Label Studio goes away for good after the first four tasks
            for n, task in enumerate(stream):
                if n == 4:
                    raise LabelStudioAPIError(
                        "list tasks of project 7: Label Studio answered 503", kind="upstream"
                    )
                yield task

        return tasks(), total

    monkeypatch.setattr(prelabel_cli, "_task_stream", failing)
    assert command(*engine, "--batch-tasks", "2", "--chunk-tasks", "2") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "Label Studio answered 503" in line]
    assert len(err) == 1, err
    written = [t for t in ids if ls.predictions_of(t, VERSION)]
    assert written == ids[:4]  # what was listed before the failure is predicted and written, once
    assert all(len(ls.predictions_of(t, VERSION)) == 1 for t in written)


def test_without_a_task_count_the_ids_are_listed_first(local_ray, ls, command, capsys):
    ids = keep_tasks(ls, 3)
    ls.add_view(5, keep=lambda task: True)  # a view, some tasks maybe annotated: no count
    assert command("--ray", "--view", "5", "--unannotated", "--batch-tasks", "2") == 0
    assert "predicted                      3" in capsys.readouterr().out
    assert all(len(ls.predictions_of(t, VERSION)) == 1 for t in ids)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--project", "99", "--ray"], "has no project 99"),
        (["--project", "7", "--ray", "--serial"], "leave out --ray"),
        (["--project", "7", "--ray-actors", "2"], "need --ray"),
        (["--project", "7", "--ray", "auto", "--ray-cpus", "2"], "--ray-cpus sizes a local Ray"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(ls, command, capsys, argv, expected):
    assert main(["prelabel", "--quiet", *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expected in err[0], err


def test_missing_weights_are_one_line_before_ray_starts(ls, command, monkeypatch, capsys):
    monkeypatch.setenv("SAM_MODEL", "vit_b")  # its checkpoint is not in MODEL_DIR
    started = []
    monkeypatch.setattr(ray_engine, "connect", lambda options: started.append(options))
    assert command("--ray") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert (
        "sam_vit_b_01ec64.pth is missing" in " ".join(err) and "osprey-label download --sam vit_b" in err[-1]
    )
    assert started == []  # found by the driver, not by a model actor on the cluster


def test_without_the_ray_extra_the_command_says_how_to_install_it(ls, command, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as in an install without the extra
    assert command("--ray") == 2
    assert "pip install 'osprey-label[ray]'" in capsys.readouterr().err

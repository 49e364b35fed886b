"""The held-out split shared by the head and LoRA training jobs."""

from __future__ import annotations

from backend.learning.heldout import heldout, heldout_flags


def test_regions_of_one_task_fall_on_the_same_side_and_about_one_task_in_five_is_held_out():
    assert all(heldout(7, a) == heldout(7, 1) for a in range(50))  # the task decides, not the annotation
    share = sum(heldout(task, 0) for task in range(5000)) / 5000
    assert 0.17 < share < 0.23
    assert {heldout(None, a) for a in range(50)} == {True, False}  # no task: the annotation decides


def test_flags_follow_the_task_hash_when_both_sides_are_filled():
    keys = [(task, 100 + task) for task in range(40)]
    assert heldout_flags(keys) == [heldout(t, a) for t, a in keys]
    assert any(heldout_flags(keys)) and not all(heldout_flags(keys))


def test_a_project_on_one_side_of_the_hash_holds_out_every_fifth_region():
    one_task = [(3, a) for a in range(12)]  # every region of one task: all on one side of the hash
    assert heldout_flags(one_task) == [i % 5 == 0 for i in range(12)]
    assert heldout_flags([]) == []

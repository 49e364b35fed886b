"""``bench/gpu_suite.py`` on the CPU with the tiny presets: every part runs or says why not, the
answers it compares agree, and it writes its JSON file and markdown table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.py"
PARTS = ["regions", "sam", "peak_memory", "lora", "prelabel", "decode", "memory", "contention"]
IN_PROCESS = ["regions", "sam", "peak_memory", "lora", "prelabel", "decode"]  # no script of another session


def run_suite(tmp_path: Path, budget_s: float) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "results" / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--preset", "tiny", "--sam", "tiny", "--device", "cpu",
         "--budget-s", str(budget_s), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=budget_s + 300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, out


def read_report(out: Path) -> tuple[dict, str]:
    report = json.loads(out.read_text(encoding="utf-8"))
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert list(report["parts"]) == PARTS
    assert {"name", "torch", "device"} <= set(report["device"])
    for name in PARTS:
        part = report["parts"][name]
        assert part["status"] in ("ran", "skipped"), (name, part["reason"])
        assert part["status"] == "ran" or part["reason"], f"{name} was skipped without a reason"
        assert f"| {name} | {part['status']} |" in table
    return report, table


@pytest.mark.slow
def test_the_tiny_suite_runs_every_part_and_its_answers_agree(tmp_path):
    proc, out = run_suite(tmp_path, budget_s=420)  # the decode part compiles on the CPU
    report, table = read_report(out)
    parts = report["parts"]
    not_run = [name for name in IN_PROCESS if parts[name]["status"] != "ran"]
    assert not not_run, {name: parts[name]["reason"] for name in not_run}
    compared = {
        name: part["answers_same"] for name, part in parts.items() if part["answers_same"] is not None
    }
    assert {"regions", "lora", "prelabel", "decode"} <= set(compared)
    assert all(compared.values()), compared
    assert all(row["same_answers"] for row in parts["regions"]["rows"])
    assert all(row["same"] for row in parts["prelabel"]["rows"])
    assert [row["decode"] for row in parts["decode"]["rows"]] == ["eager", "compiled"]
    assert [row["regions"] for row in parts["regions"]["rows"]] == report["suite"]["profile"]["regions"]
    [lora] = parts["lora"]["rows"]
    assert lora["steps"] == report["suite"]["profile"]["lora_steps"] and lora["step_s_median"] > 0
    assert lora["label_calls_during"] >= 1
    [task] = parts["peak_memory"]["rows"]
    assert task["regions"] >= 1
    if task["method"].startswith("LiveBytes"):
        assert task["task_gb"] > 0
    cases = {row["case"] for row in parts["sam"]["rows"]}
    assert {"following click (cached embedding)", "segment everything (cached embedding)"} <= cases
    assert table in proc.stdout  # the table is printed too


def test_parts_that_would_run_past_the_budget_are_skipped_with_the_reason(tmp_path):
    _, out = run_suite(tmp_path, budget_s=1)  # start-up alone takes longer
    report, _ = read_report(out)
    for name, part in report["parts"].items():
        assert part["status"] == "skipped" and "budget" in part["reason"], (name, part)
    assert report["setup"]["osprey"] == "tiny"

"""Start-up checks: folders proven writable, the device chosen or refused with the fix, the report.

Machines are simulated through the probes (device nodes, the driver's /proc file, nvidia-smi,
torch's CUDA facts), so the "GPU present but torch cannot use it" case runs on any CPU box.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from backend.runtime.startup import (
    MachineFacts,
    StartupError,
    check_writable,
    driver_version,
    gpu_present,
    machine_facts,
    minimum_driver,
    resolve_device,
    resolve_device_from_torch,
    startup_report,
)

NOBODY = 65534
# The first line of /proc/driver/nvidia/version for the proprietary and the open kernel module.
PROC_PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
PROC_OPEN = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025\n"
)


def _writes_ignore_permissions(base: Path) -> bool:
    """True as root (or with CAP_DAC_OVERRIDE): a 0o555 folder still takes new files."""
    probe = base / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
        return True
    except PermissionError:
        return False
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


def _startup_error_as(uid: int, folders: dict[str, Path]) -> str:
    """Run check_writable in a forked child that dropped to ``uid``; the StartupError's message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                check_writable(folders)
                outcome = "no error"
            except StartupError as error:
                outcome = f"StartupError: {error}"
            os.write(write_end, outcome.encode())
        except BaseException as error:  # whatever happens, the parent must hear of it and the child exit
            os.write(write_end, f"child failed: {error!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    if outcome.startswith("child failed: PermissionError"):
        pytest.skip(f"cannot drop to uid {uid} here ({outcome})")
    assert outcome.startswith("StartupError: "), outcome
    return outcome.removeprefix("StartupError: ")


def test_missing_folders_are_created_with_their_parents_and_left_empty(tmp_path):
    models, cache = tmp_path / "a" / "models", tmp_path / "cache"
    check_writable({"MODEL_DIR": models, "OSPREY_CACHE_DIR": str(cache), "UNSET": None})
    assert models.is_dir() and cache.is_dir()
    assert list(models.iterdir()) == [] and list(cache.iterdir()) == []  # the probe file is gone


def test_a_folder_the_user_cannot_write_is_refused_naming_setting_path_owner_and_chown(tmp_path):
    # Under root a 0o555 folder still takes files: drop to nobody in a child, with the folder in a
    # base that nobody may traverse (pytest's own tmp root is 0o700).
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        locked = base / "models"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)  # mkdir's mode is filtered by the umask
        if _writes_ignore_permissions(base):
            message = _startup_error_as(NOBODY, {"MODEL_DIR": locked})
            runner = NOBODY
        else:
            with pytest.raises(StartupError) as raised:
                check_writable({"MODEL_DIR": locked})
            message, runner = str(raised.value), os.getuid()
    finally:
        for folder in base.rglob("*"):
            folder.chmod(0o755)
        shutil.rmtree(base)
    assert f"MODEL_DIR={locked}: a file cannot be created in it (Permission denied)" in message
    assert f"It is a folder owned by uid {os.getuid()}" in message and "(mode 555)" in message
    assert f"This process runs as uid {runner}" in message
    assert "sudo chown -R 1000:1000 <host folder>" in message
    assert f"set MODEL_DIR to a folder that uid {runner} can write" in message


def test_a_file_in_the_way_is_refused_with_the_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StartupError) as raised:
        check_writable({"MODEL_DIR": Path("blocker/models")})
    message = str(raised.value)
    assert f"MODEL_DIR={tmp_path / 'blocker' / 'models'}: it cannot be created" in message
    assert f"Its nearest existing parent {tmp_path / 'blocker'} is a file, not a folder" in message
    assert "move the file away" in message


def test_every_failing_folder_is_reported_in_one_message(tmp_path):
    (tmp_path / "file").write_text("x")
    good = tmp_path / "good"
    with pytest.raises(StartupError) as raised:
        check_writable(
            {"MODEL_DIR": tmp_path / "file", "OSPREY_CACHE_DIR": tmp_path / "file" / "c", "HF": good}
        )
    message = str(raised.value)
    assert f"MODEL_DIR={tmp_path / 'file'}" in message
    assert f"OSPREY_CACHE_DIR={tmp_path / 'file' / 'c'}" in message
    assert message.count("Fix:") == 2 and "HF=" not in message
    assert good.is_dir()  # the folders after a failure were still checked


def test_gpu_presence_from_device_nodes_or_nvidia_smi(tmp_path):
    def no_smi(_):
        return None

    assert not gpu_present(dev=tmp_path, which=no_smi)
    for name in ("nvidia-uvm", "nvidia-modeset", "nvidia-caps"):  # loaded modules, no GPU node
        (tmp_path / name).touch()
    assert not gpu_present(dev=tmp_path, which=no_smi)
    assert gpu_present(dev=tmp_path, which=lambda name: "/usr/bin/nvidia-smi")
    assert not gpu_present(dev=tmp_path / "absent", which=no_smi)
    (tmp_path / "nvidiactl").touch()
    assert gpu_present(dev=tmp_path, which=no_smi)
    (tmp_path / "nvidiactl").unlink()
    (tmp_path / "nvidia3").touch()
    assert gpu_present(dev=tmp_path, which=no_smi)


@pytest.mark.parametrize(("text", "version"), [(PROC_PROPRIETARY, "535.104.05"), (PROC_OPEN, "580.65.06")])
def test_driver_version_is_read_from_the_kernel_module_file(tmp_path, text, version):
    proc = tmp_path / "version"
    proc.write_text(text)

    def run(*args, **kwargs):
        raise AssertionError("nvidia-smi must not run when /proc names the driver")

    assert driver_version(proc=proc, run=run) == version


def test_driver_version_falls_back_to_nvidia_smi_with_a_timeout(tmp_path):
    calls = []

    def run(argv, **kwargs):
        calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, 0, stdout="535.104.05\n535.104.05\n", stderr="")

    assert driver_version(proc=tmp_path / "absent", run=run) == "535.104.05"
    (argv, kwargs), *_ = calls
    assert argv == ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    assert 0 < kwargs["timeout"] <= 30


@pytest.mark.parametrize(
    "outcome",
    [
        FileNotFoundError(2, "No such file or directory", "nvidia-smi"),
        subprocess.TimeoutExpired("nvidia-smi", 10),
        subprocess.CompletedProcess([], 9, stdout="", stderr="NVIDIA-SMI has failed"),
        subprocess.CompletedProcess([], 0, stdout="No devices were found\n", stderr=""),
    ],
)
def test_driver_version_is_none_when_nothing_says(tmp_path, outcome):
    def run(argv, **kwargs):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert driver_version(proc=tmp_path / "absent", run=run) is None


@pytest.mark.parametrize(
    ("cuda", "minimum"),
    [("13.0", "580.65.06"), ("13.1", "580.65.06"), ("12.6", "525.60.13"), ("11.8", "450.80.02")]
    + [(None, None), ("10.2", None), ("", None)],
)
def test_minimum_driver_per_cuda_major_version(cuda, minimum):
    assert minimum_driver(cuda) == minimum


def _probes(*, available: bool, present: bool, driver: str | None = None, cuda: str | None = "13.0"):
    return {
        "cuda_available": lambda: available,
        "torch_cuda": cuda,
        "present": lambda: present,
        "driver": lambda: driver,
        "device_count": lambda: 2 if available else 0,
    }


def test_a_gpu_torch_cannot_use_stops_the_start_with_versions_and_fixes():
    with pytest.raises(StartupError) as raised:
        resolve_device(None, **_probes(available=False, present=True, driver="535.104.05"))
    message = str(raised.value)
    assert "NVIDIA driver 535.104.05 is installed" in message
    assert "built for CUDA 13.0" in message and "needs driver >= 580.65.06" in message
    assert "install a newer NVIDIA driver (>= 580.65.06)" in message
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126" in message
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126" in message
    assert "OSPREY_DEVICE=cpu" in message


def test_cpu_on_purpose_is_kept_even_with_a_usable_gpu():
    def untouched():
        raise AssertionError("OSPREY_DEVICE=cpu must not probe the GPU")

    chosen = resolve_device(
        "cpu", cuda_available=untouched, torch_cuda="13.0", present=untouched, driver=untouched
    )
    assert chosen == "cpu"
    assert resolve_device(" CPU ", **_probes(available=True, present=True)) == "cpu"


def test_automatic_choice_uses_the_gpu_when_torch_can_and_the_cpu_when_there_is_none():
    assert resolve_device(None, **_probes(available=True, present=True)) == "cuda"
    assert resolve_device("auto", **_probes(available=True, present=True)) == "cuda"
    assert resolve_device(None, **_probes(available=False, present=False)) == "cpu"
    assert resolve_device(None, **_probes(available=False, present=False, cuda=None)) == "cpu"


def test_a_requested_gpu_without_cuda_is_refused_with_the_reason():
    with pytest.raises(StartupError, match=r"OSPREY_DEVICE=cuda asks for a GPU.*--gpus all"):
        resolve_device("cuda", **_probes(available=False, present=False))
    with pytest.raises(StartupError, match=r"OSPREY_DEVICE=cuda:1 asks.*535\.104\.05.*580\.65\.06"):
        resolve_device("cuda:1", **_probes(available=False, present=True, driver="535.104.05"))


def test_requested_gpu_indices_are_checked_and_unknown_names_refused():
    assert resolve_device("cuda:1", **_probes(available=True, present=True)) == "cuda:1"
    with pytest.raises(StartupError, match=r"names GPU 2, but torch sees 2 GPU\(s\) \(indices 0 to 1\)"):
        resolve_device("cuda:2", **_probes(available=True, present=True))
    with pytest.raises(
        StartupError, match=r"OSPREY_DEVICE='gpu' is not a device.*expected cpu, cuda or cuda:N"
    ):
        resolve_device("gpu", **_probes(available=True, present=True))


def test_a_new_enough_driver_that_still_fails_points_at_visibility(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(StartupError) as raised:
        resolve_device(None, **_probes(available=False, present=True, driver="580.82.07"))
    message = str(raised.value)
    assert "580.82.07 meets CUDA 13.0's minimum (580.65.06)" in message
    assert "CUDA_VISIBLE_DEVICES (now '')" in message and "nvidia-smi" in message


def test_a_cpu_only_torch_on_a_gpu_machine_says_so():
    with pytest.raises(StartupError, match=r"CPU-only build \(torch.version.cuda is None\)"):
        resolve_device(None, **_probes(available=False, present=True, driver="580.82.07", cuda=None))


def test_resolving_from_this_machines_torch():
    assert resolve_device_from_torch("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device_from_torch(None) == "cuda"
    elif not gpu_present():
        assert resolve_device_from_torch(None) == "cpu"


def test_the_report_of_a_simulated_h100_names_gpu_driver_and_torch_cuda():
    facts = MachineFacts(
        torch_version="2.9.1+cu130",
        torch_cuda="13.0",
        cudnn_version=91002,
        driver="580.82.07",
        gpu_name="NVIDIA H100 80GB HBM3",
        gpu_memory_bytes=85_520_809_984,
        compute_capability=(9, 0),
        cpu_threads=16,
    )
    weights = {"osprey": "/models/Osprey-7b", "sam": "/models/sam_vit_h_4b8939.pth"}
    lines = startup_report(device="cuda:0", dtype=str(torch.bfloat16), weights=weights, facts=facts)
    assert lines == [
        "device: cuda:0 (NVIDIA H100 80GB HBM3, 79.6 GiB, compute capability 9.0)",
        "NVIDIA driver: 580.82.07",
        "torch 2.9.1+cu130 (built for CUDA 13.0, cuDNN 9.10.2)",
        "dtype: bfloat16",
        "weights osprey: /models/Osprey-7b",
        "weights sam: /models/sam_vit_h_4b8939.pth",
    ]


def test_the_report_of_a_cpu_only_build_and_cudnn_8_numbering():
    cpu_build = MachineFacts(torch_version="2.5.1+cpu", torch_cuda=None, cudnn_version=None, driver=None)
    lines = startup_report(device="cpu", dtype="float32", weights={}, facts=cpu_build)
    assert lines == [
        "device: cpu",
        "NVIDIA driver: none found",
        "torch 2.5.1+cpu (CPU-only build)",
        "dtype: float32",
    ]
    cuda12 = MachineFacts(
        torch_version="2.3.1+cu121", torch_cuda="12.1", cudnn_version=8902, driver="535.104.05"
    )
    assert "torch 2.3.1+cu121 (built for CUDA 12.1, cuDNN 8.9.2)" in startup_report(
        device="cpu", dtype="float32", weights={}, facts=cuda12
    )


def test_the_report_of_this_machine_reads_the_real_torch():
    lines = startup_report(device="cpu", dtype="float32", weights={"osprey": "tiny"})
    facts = machine_facts("cpu")
    assert lines[0] == f"device: cpu ({torch.get_num_threads()} threads)"
    assert lines[2].startswith(f"torch {torch.__version__} (")
    assert facts.torch_cuda == torch.version.cuda
    if torch.version.cuda:
        assert f"built for CUDA {torch.version.cuda}" in lines[2]
    assert lines[-1] == "weights osprey: tiny"

"""Checks a server makes before any model loads, and the first lines it logs.

A 7B model takes minutes to load, so whatever would stop the server later (a folder it cannot write,
a GPU that torch cannot use) is found here first and reported as one :class:`StartupError` whose
message says what is wrong, with the paths and versions involved, and how to fix it. Every probe of
the machine (``/dev``, ``/proc``, ``nvidia-smi``, torch) is a parameter, so tests simulate machines.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# The image's user (Dockerfile: `useradd --uid 1000`): what a bind-mounted host folder must belong to.
IMAGE_UID = 1000

# Minimum Linux driver per CUDA runtime major version, as NVIDIA's CUDA Toolkit Release Notes publish
# them (table "CUDA Toolkit and Corresponding Driver Versions", and "CUDA Minor Version Compatibility"
# in docs.nvidia.com/deploy/cuda-compatibility): 13.x needs the 13.0 GA driver; 12.x and 11.x run on
# the oldest driver of their family under minor version compatibility.
MINIMUM_DRIVER = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}

# The PyTorch index whose builds (CUDA 12.6) run on the oldest drivers current torch supports.
OLDER_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"

_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")
_VERSION = re.compile(r"(?<![\w.])\d+\.\d+(?:\.\d+)?(?![\w.])")


class StartupError(RuntimeError):
    """A start-up that must stop; the message is the whole text the user reads (cause and fix)."""


def check_writable(folders: Mapping[str, Path | str | None]) -> None:
    """Create each folder if missing (parents too) and prove it writable with a temporary file.

    ``folders`` maps a setting's name to its value, e.g. ``{"MODEL_DIR": Path("./models")}``; a
    ``None`` value (setting unset) is skipped. Every folder is checked and every failure reported
    together in one :class:`StartupError` naming the setting, the absolute path, the process's
    uid/gid, the owner of the folder (or of its nearest existing parent) and the fix.
    """
    problems = []
    for setting, value in folders.items():
        if value is None:
            continue
        folder = Path(os.path.abspath(Path(value).expanduser()))
        failure = _write_probe(folder)
        if failure is not None:
            problems.append(_describe(setting, folder, *failure))
    if problems:
        raise StartupError(
            "Cannot write to the folders this server needs (checked before loading any model):\n"
            + "\n".join(problems)
        )


def _write_probe(folder: Path) -> tuple[str, OSError] | None:
    """What failed and why, or None when a file was created in ``folder`` and removed again."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return "it cannot be created", error
    try:
        handle, name = tempfile.mkstemp(prefix=".osprey-write-check-", dir=folder)
    except OSError as error:
        return "a file cannot be created in it", error
    os.close(handle)
    try:
        os.unlink(name)
    except OSError as error:
        return "a file created in it cannot be removed", error
    return None


def _describe(setting: str, folder: Path, failed: str, error: OSError) -> str:
    uid, gid = os.getuid(), os.getgid()
    owner = ""
    for candidate in (folder, *folder.parents):
        try:
            info = candidate.stat()
        except OSError:
            continue
        where = "It" if candidate == folder else f"Its nearest existing parent {candidate}"
        kind = "folder" if candidate.is_dir() else "file, not a folder,"
        mode = f"{info.st_mode & 0o777:o}"
        owner = f" {where} is a {kind} owned by uid {info.st_uid}, gid {info.st_gid} (mode {mode})."
        break
    if error.errno == errno.EROFS:
        fix = "the file system is read-only: mount it read-write (no `:ro` on a container volume)"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "a file stands where a folder must be: move the file away"
    else:
        fix = (
            f"if {folder} is bind-mounted into the container, give the host folder to the image's "
            f"user, on the host: `sudo chown -R {IMAGE_UID}:{IMAGE_UID} <host folder>` (the image runs "
            f"as uid {IMAGE_UID}); outside a container: `sudo chown -R {uid}:{gid} {folder}`"
        )
    return (
        f"  - {setting}={folder}: {failed} ({error.strerror or error}).{owner} "
        f"This process runs as uid {uid}, gid {gid}.\n"
        f"    Fix: {fix}; or set {setting} to a folder that uid {uid} can write."
    )


def gpu_present(*, dev: Path = Path("/dev"), which: Callable[[str], str | None] = shutil.which) -> bool:
    """Whether this machine (or container) has an NVIDIA GPU, whether or not torch can use it:
    a ``/dev/nvidia<N>`` or ``/dev/nvidiactl`` device node, or ``nvidia-smi`` on PATH."""
    try:
        names = [entry.name for entry in dev.iterdir()]
    except OSError:
        names = []
    if any(name == "nvidiactl" or re.fullmatch(r"nvidia\d+", name) for name in names):
        return True
    return which("nvidia-smi") is not None


def driver_version(
    *,
    proc: Path = Path("/proc/driver/nvidia/version"),
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> str | None:
    """The NVIDIA driver version (e.g. ``"535.104.05"``) from ``proc`` (the kernel module's
    ``NVRM version`` line), else from ``nvidia-smi``; None when neither says."""
    try:
        for line in proc.read_text().splitlines():
            if line.startswith("NVRM version") and (found := _VERSION.search(line)):
                return found.group()
    except OSError:
        pass  # no kernel module visible here (no GPU, or a container given none): ask nvidia-smi
    try:
        result = run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,  # a hung driver must not hang the start-up
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (result.stdout or "").strip().splitlines()
    if result.returncode != 0 or not lines:
        return None
    found = _VERSION.fullmatch(lines[0].strip())  # one line per GPU, all the same driver
    return found.group() if found else None


def minimum_driver(cuda_version: str | None) -> str | None:
    """The minimum Linux NVIDIA driver for a CUDA runtime (``torch.version.cuda``, e.g. ``"13.0"``);
    None for no CUDA or a major version not in NVIDIA's table."""
    if not cuda_version:
        return None
    major = cuda_version.split(".")[0]
    return MINIMUM_DRIVER.get(int(major)) if major.isdigit() else None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _why_no_cuda(*, torch_cuda: str | None, present: bool, driver: str | None) -> str:
    """Why torch cannot use a GPU, and the fixes, for a StartupError."""
    if not present:
        return (
            "no NVIDIA GPU is visible here (no /dev/nvidia* device, no nvidia-smi). In Docker, start "
            "the container with `--gpus all` (or the compose file's device reservation) on a host with "
            "the NVIDIA driver and the NVIDIA Container Toolkit."
        )
    if torch_cuda is None:
        return (
            "a GPU is present but this torch is a CPU-only build (torch.version.cuda is None). "
            "Install a CUDA build: `pip install torch torchvision` from PyPI, or for an older driver "
            f"`pip install torch torchvision --index-url {OLDER_CUDA_INDEX}`."
        )
    minimum = minimum_driver(torch_cuda)
    installed = f"NVIDIA driver {driver}" if driver else "an NVIDIA driver whose version could not be read"
    if driver and minimum and _version_key(driver) >= _version_key(minimum):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (
            f"a GPU is present and {installed} meets CUDA {torch_cuda}'s minimum ({minimum}), yet "
            f"torch.cuda.is_available() is False. Check that `nvidia-smi` works, that "
            f"CUDA_VISIBLE_DEVICES (now {visible!r}) names a GPU, and in Docker that the container "
            "runs with `--gpus all`."
        )
    needs = f"needs driver >= {minimum}" if minimum else "needs a driver NVIDIA's table does not list here"
    return (
        f"a GPU is present but this torch cannot use it: {installed} is installed, and this torch is "
        f"built for CUDA {torch_cuda} (torch.version.cuda), which {needs}.\n"
        "Fix one of:\n"
        f"  - install a newer NVIDIA driver (>= {minimum or 'the one CUDA ' + torch_cuda + ' needs'});\n"
        "  - install a torch build for an older CUDA that this driver runs, e.g. "
        f"`pip install torch torchvision --index-url {OLDER_CUDA_INDEX}` (CUDA 12.6, driver >= "
        f"{MINIMUM_DRIVER[12]}), or rebuild the Docker image with "
        f"`docker build --build-arg TORCH_INDEX_URL={OLDER_CUDA_INDEX} .`;\n"
        "  - or set OSPREY_DEVICE=cpu to run on the CPU on purpose."
    )


def resolve_device(
    requested: str | None,
    *,
    cuda_available: Callable[[], bool],
    torch_cuda: str | None,
    present: Callable[[], bool],
    driver: Callable[[], str | None],
    device_count: Callable[[], int] | None = None,
) -> str:
    """The torch device string to serve on, from the OSPREY_DEVICE setting ``requested``.

    ``"cpu"`` is kept even with a GPU (on purpose); ``"cuda"``/``"cuda:N"`` is kept when CUDA is
    available (and, given ``device_count``, N exists); None or ``"auto"`` picks ``"cuda"`` when
    available and ``"cpu"`` when the machine has no GPU. Raises :class:`StartupError` for anything
    else: a CUDA device requested but unusable, a GPU present that torch cannot use (never a
    silent CPU run), or an unknown device name. ``torch_cuda`` is ``torch.version.cuda``.
    """
    name = (requested or "auto").strip().lower()
    if name == "auto":
        if cuda_available():
            return "cuda"
        if not present():
            return "cpu"
        raise StartupError(
            "OSPREY_DEVICE is unset (auto), and "
            + _why_no_cuda(torch_cuda=torch_cuda, present=True, driver=driver())
        )
    matched = _DEVICE.fullmatch(name)
    if matched is None:
        raise StartupError(
            f"OSPREY_DEVICE={requested!r} is not a device this server runs on; expected cpu, cuda or "
            "cuda:N (N a GPU index), or leave it unset to use the GPU when torch can."
        )
    if name == "cpu":
        return "cpu"
    if not cuda_available():
        is_present = present()
        raise StartupError(
            f"OSPREY_DEVICE={name} asks for a GPU, but "
            + _why_no_cuda(torch_cuda=torch_cuda, present=is_present, driver=driver() if is_present else None)
        )
    index = matched.group(1)
    if index is not None and device_count is not None and int(index) >= (count := device_count()):
        raise StartupError(
            f"OSPREY_DEVICE={name} names GPU {index}, but torch sees {count} GPU(s) (indices 0 to "
            f"{count - 1}). Set OSPREY_DEVICE=cuda:<index> within that range, or cuda for the first."
        )
    return name


def resolve_device_from_torch(requested: str | None) -> str:
    """:func:`resolve_device` with the probes filled from torch, ``/dev``, ``/proc`` and nvidia-smi."""
    import torch

    return resolve_device(
        requested,
        cuda_available=torch.cuda.is_available,
        torch_cuda=torch.version.cuda,
        present=gpu_present,
        driver=driver_version,
        device_count=torch.cuda.device_count,
    )


@dataclass(frozen=True)
class MachineFacts:
    """What the start-up report states about the machine; :func:`machine_facts` reads the real one."""

    torch_version: str
    torch_cuda: str | None  # torch.version.cuda: the CUDA this torch was built for
    cudnn_version: int | None  # torch.backends.cudnn.version(), e.g. 91002 for 9.10.2
    driver: str | None
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    compute_capability: tuple[int, int] | None = None
    cpu_threads: int | None = None


def machine_facts(device: str) -> MachineFacts:
    """The facts about this machine for ``device`` (a resolved torch device string)."""
    import torch

    gpu = {}
    if device.startswith("cuda"):
        index = torch.device(device).index
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
        gpu = {
            "gpu_name": props.name,
            "gpu_memory_bytes": props.total_memory,
            "compute_capability": (props.major, props.minor),
        }
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return MachineFacts(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn_version=cudnn,
        driver=driver_version(),
        cpu_threads=torch.get_num_threads(),
        **gpu,
    )


def _cudnn_text(version: int) -> str:
    # cuDNN 9 encodes major*10000 + minor*100 + patch; cuDNN 8 and older major*1000 + minor*100 + patch
    major, rest = divmod(version, 10000) if version >= 90000 else divmod(version, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def startup_report(
    *, device: str, dtype: str, weights: Mapping[str, str], facts: MachineFacts | None = None
) -> list[str]:
    """The first lines a server logs: device (on CUDA the GPU, its memory and compute capability),
    NVIDIA driver, torch and its CUDA and cuDNN, dtype, and each model's weights path.

    ``weights`` maps a model's name to where its weights are read from, e.g. ``{"osprey":
    "/models/Osprey-7b", "sam": "/models/sam_vit_h_4b8939.pth"}``. ``facts`` defaults to
    :func:`machine_facts` for ``device``.
    """
    facts = machine_facts(device) if facts is None else facts
    if device.startswith("cuda") and facts.gpu_name:
        details = [facts.gpu_name]
        if facts.gpu_memory_bytes is not None:
            details.append(f"{facts.gpu_memory_bytes / 2**30:.1f} GiB")
        if facts.compute_capability is not None:
            details.append("compute capability {}.{}".format(*facts.compute_capability))
        device_line = f"device: {device} ({', '.join(details)})"
    elif device == "cpu" and facts.cpu_threads:
        device_line = f"device: cpu ({facts.cpu_threads} threads)"
    else:
        device_line = f"device: {device}"
    if facts.torch_cuda:
        build = f"built for CUDA {facts.torch_cuda}"
        if facts.cudnn_version:
            build += f", cuDNN {_cudnn_text(facts.cudnn_version)}"
    else:
        build = "CPU-only build"
    lines = [
        device_line,
        f"NVIDIA driver: {facts.driver or 'none found'}",
        f"torch {facts.torch_version} ({build})",
        f"dtype: {str(dtype).removeprefix('torch.')}",
    ]
    lines += [f"weights {name}: {path}" for name, path in weights.items()]
    return lines

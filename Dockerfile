# osprey-label: the Label Studio ML backend (Osprey + SAM), `osprey-label serve` on port 9090.
#
#   docker build -t osprey-label .
#   docker run --gpus all -p 9090:9090 -v osprey-models:/models osprey-label           # GPU
#   docker run -p 9090:9090 -v osprey-models:/models osprey-label                      # CPU
#   docker run --rm -v osprey-models:/models osprey-label download                     # fetch weights
#   docker build --build-arg EXTRAS=ray -t osprey-label:ray .                          # with Ray Data
#
# Podman: `podman build --format docker -t osprey-label .`; its default (OCI) image format has no
# HEALTHCHECK, so without `--format docker` the health check below is silently dropped.
#
# Base image: slim Python rather than nvidia/cuda. The PyPI torch wheels for Linux carry their own
# CUDA and cuDNN libraries (the nvidia-* wheels they depend on), so one image runs on a GPU when the
# NVIDIA container runtime hands it one (`--gpus`, or the compose file's device reservation; the
# host needs only the driver) and on a CPU everywhere else. A CUDA base image would add a second,
# unused copy of those libraries.
#
# NVIDIA driver: torch and torchvision come from the package index TORCH_INDEX_URL (a build argument,
# default PyPI). PyPI's torch is built for CUDA 13.x, which needs host driver >= 580.65.06 (`nvidia-smi`
# prints the installed one). For an older driver, build with a torch for CUDA 12.6 (driver >= 525.60.13):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t osprey-label .
# (https://download.pytorch.org/whl/cpu gives a smaller, CPU-only image.) A GPU that the image's torch
# cannot use stops the server at start-up with the versions and these fixes, never a silent CPU run.
FROM python:3.11-slim-bookworm

# MODEL_DIR holds the SAM checkpoints, the training store and trained versions; HF_HOME the Hugging
# Face cache with the Osprey checkpoint and the CLIP tower. Both live in the /models volume, so the
# weights are fetched once (`osprey-label download`) and outlive the container.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/models \
    HF_HOME=/models/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid 1000 osprey \
    && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin osprey \
    && mkdir -p /models/huggingface \
    && chown -R osprey:osprey /models

WORKDIR /app

# Dependencies first, so that editing the code does not reinstall torch. torch and torchvision come
# first, from TORCH_INDEX_URL, with requirements.txt's own lines for them; the full install after it
# finds them satisfied and keeps that build.
COPY requirements.txt ./
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN grep -E '^(torch|torchvision)([<>=!~ ;]|$)' requirements.txt > /tmp/torch-requirements.txt \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" -r /tmp/torch-requirements.txt \
    && pip install --no-cache-dir -r requirements.txt \
    && rm /tmp/torch-requirements.txt

COPY pyproject.toml README.md ./
COPY osprey ./osprey
COPY backend ./backend
# `pip install .` builds in the source tree: its build/ and *.egg-info would stay in /app otherwise.
# EXTRAS names optional extras of pyproject.toml to install as well, e.g. `--build-arg EXTRAS=ray` for
# an image that runs `osprey-label prelabel --ray` on a Ray cluster (every node runs this image).
ARG EXTRAS=""
RUN pip install --no-cache-dir --no-deps . \
    && if [ -n "$EXTRAS" ]; then pip install --no-cache-dir "./[$EXTRAS]"; fi \
    && rm -rf build ./*.egg-info

USER 1000:1000
# Declared after the chown above, so a new named volume starts owned by the osprey user.
VOLUME ["/models"]
EXPOSE 9090

# Models load before the port answers (a 7B checkpoint takes minutes), hence the long start period.
# With BASIC_AUTH_USER set, /health needs the credentials too.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import base64, os, urllib.request as u; r = u.Request('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090')); user = os.environ.get('BASIC_AUTH_USER'); user and r.add_header('Authorization', 'Basic ' + base64.b64encode(('%s:%s' % (user, os.environ.get('BASIC_AUTH_PASS', ''))).encode()).decode()); u.urlopen(r, timeout=8)"]

ENTRYPOINT ["osprey-label"]
CMD ["serve"]

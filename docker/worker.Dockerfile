# syntax=docker/dockerfile:1
# The kvpilot worker: the decode engine with torch and triton at the versions the kernels
# were tested with (pyproject.toml's worker extra pins the same ones). The CUDA base image
# sets the variables that make the NVIDIA container runtime mount the driver; torch's
# wheels bring their own CUDA libraries. Triton compiles its kernel launchers at run time,
# hence gcc and the Python headers. Built from the repository root:
#   docker build -f docker/worker.Dockerfile -t REGISTRY/kvpilot/worker:0.1.0 .
ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION}
ARG TORCH_VERSION=2.11.0
ARG TRITON_VERSION=3.6.0
ARG PIP_VERSION=25.3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's security updates replace these packages' exact versions, so they are not
# pinned: the base image tag fixes the release they come from.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 kvpilot \
 && useradd --uid 65532 --gid 65532 --create-home --home-dir /home/kvpilot kvpilot
WORKDIR /src
RUN python3 -m venv /opt/kvpilot \
 && /opt/kvpilot/bin/pip install --no-cache-dir "pip==${PIP_VERSION}" \
 && /opt/kvpilot/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" "triton==${TRITON_VERSION}"
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY worker/ worker/
RUN /opt/kvpilot/bin/pip install --no-cache-dir ".[worker]" \
 && rm -rf /src
ENV PATH=/opt/kvpilot/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kvpilot
WORKDIR /home/kvpilot
USER 65532:65532
EXPOSE 8000
# The operator sets the command of worker pods (worker.command in the chart); this is
# the same one.
CMD ["python", "-m", "kvpilot.worker"]

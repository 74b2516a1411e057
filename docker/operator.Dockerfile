# syntax=docker/dockerfile:1
# The kvpilot operator: kopf, the Kubernetes client and kvpilot's pure Python, no torch.
# Built from the repository root:
#   docker build -f docker/operator.Dockerfile -t REGISTRY/kvpilot/operator:0.1.0 .
ARG PYTHON_VERSION=3.12.12
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
ARG PIP_VERSION=25.3
WORKDIR /src
RUN python -m venv /opt/kvpilot \
 && /opt/kvpilot/bin/pip install --no-cache-dir "pip==${PIP_VERSION}"
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY worker/ worker/
# The core dependencies only: the worker extra (torch, triton) stays out of this image.
RUN /opt/kvpilot/bin/pip install --no-cache-dir . \
 && /opt/kvpilot/bin/python -m compileall -q /opt/kvpilot/lib

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
COPY --from=build /opt/kvpilot /opt/kvpilot
ENV PATH=/opt/kvpilot/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The chart runs it with a read-only root filesystem as this user (no name needed).
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["kvpilot"]
CMD ["operator"]

# The trainer: CPU torch by default. Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t tolaria/trainer .
# For CUDA, pass a CUDA base image that has Python 3.11 and the matching torch wheel index, e.g.
#   --build-arg BASE_IMAGE=<a CUDA 12 runtime image with python3.11> --build-arg TORCH_INDEX_URL=<cu12x wheel index>
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10000 tolaria && useradd --create-home --uid 10002 --gid 10000 trainer
WORKDIR /app
# torch first and pinned, so the project's range is already satisfied and no other build is pulled.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY governor_daemon ./governor_daemon
COPY tolaria_trainer ./tolaria_trainer
RUN pip install ".[trainer]"
USER trainer
ENTRYPOINT ["tolaria-train"]
CMD ["--task", "digits"]

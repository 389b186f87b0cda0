# The governor daemon: no torch. Build from the repository root:
#   docker build -f docker/governor.Dockerfile -t tolaria/governor .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Group tolaria (10000) is shared with the trainer image: it may read the trainer.token that `governor tokens
# init` writes (0640) into the secrets volume; the tokens file itself stays the governor's (0600).
RUN groupadd --gid 10000 tolaria && useradd --create-home --uid 10001 --gid 10000 governor \
    && mkdir /data /secrets && chown governor:tolaria /data /secrets && chmod 0700 /data && chmod 0750 /secrets
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY governor_daemon ./governor_daemon
COPY tolaria_trainer ./tolaria_trainer
# The base install has no torch: the trainer extra is not installed here.
RUN pip install . && python -c "import governor_daemon.server" && ! python -c "import torch" 2>/dev/null
USER governor
VOLUME ["/data", "/secrets"]
EXPOSE 50051 9464
# Exec form: the daemon is PID 1 and handles SIGTERM itself (health NOT_SERVING, streams ended, journal flushed).
ENTRYPOINT ["governor", "serve"]
CMD ["--listen", "0.0.0.0:50051", "--data-dir", "/data", "--metrics-listen", "0.0.0.0:9464"]

# syntax=docker/dockerfile:1
# batchscore scoring image: `docker run IMAGE run --config ...`, or a shard: `run ... --plan P --shard I`.
# Runtime dependencies only (no Airflow: the scheduler runs this image, the image does not run Airflow).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# "[compiled]" adds the compiled tree engine (treelite, TL2cgen). The runtime image has no C compiler:
# it loads libraries built ahead with `batchscore compile` (see README, Compiled engine).
ARG BATCHSCORE_EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/batchscore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY batchscore ./batchscore
RUN /opt/batchscore/bin/pip install --no-cache-dir ".${BATCHSCORE_EXTRAS}" \
    && /opt/batchscore/bin/batchscore --version

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="batchscore" \
      org.opencontainers.image.description="Batch scoring of Parquet tables with a fitted scikit-learn model" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/batchscore/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 batchscore \
    && useradd --system --uid 10001 --gid batchscore --create-home --home-dir /home/batchscore batchscore
COPY --from=build /opt/batchscore /opt/batchscore
USER 10001:10001
WORKDIR /home/batchscore
ENTRYPOINT ["batchscore"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# batchscore scoring image: `docker run IMAGE run --config ...`, or a shard: `run ... --plan P --shard I`.
# Runtime dependencies only (no Airflow: the scheduler runs this image, the image does not run Airflow).
# Build it with `make image` (scripts/build-image): it picks Docker or buildah, and a base made from
# Debian packages where python:3.11-slim-bookworm cannot be pulled (PYTHON_IMAGE names it).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# "[compiled]" (the default; 5 MB) adds the compiled tree engine (treelite, TL2cgen). The runtime image has
# no C compiler: it loads libraries built ahead with `batchscore compile` (see docs/compiled.md).
ARG BATCHSCORE_EXTRAS="[compiled]"
# The package index pip uses (empty: PyPI).
ARG PIP_INDEX=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/batchscore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY batchscore ./batchscore
# A TLS-intercepting proxy's CA bundle comes as the build secret "ca": mounted for this step only, never
# in a layer. Then the venv loses what scoring never runs: pip, the packages' own test suites, C headers and
# Cython sources, and pyarrow's Arrow Flight RPC (pyarrow.flight, 35 MB).
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && if [ -n "$PIP_INDEX" ]; then export PIP_INDEX_URL="$PIP_INDEX"; fi \
    && /opt/batchscore/bin/pip install --no-cache-dir ".${BATCHSCORE_EXTRAS}" \
    && /opt/batchscore/bin/batchscore --version \
    && /opt/batchscore/bin/pip uninstall --yes --quiet pip \
    && site="$(/opt/batchscore/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && find "$site" -depth -type d \( -name tests -o -name include \) -exec rm -rf {} + \
    && find "$site" \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.h' \) -delete \
    && rm -rf "$site"/pyarrow/src "$site"/pyarrow/*flight* \
    && /opt/batchscore/bin/python -c "import pyarrow.parquet, pyarrow.dataset, pyarrow.compute, sklearn, pandas, s3fs" 

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

# The feedback consumer (Kafka -> on-policy buffer). Build from the repository root:
#   docker build -f k8s/docker/consumer.Dockerfile -t ghcr.io/musicrl/consumer:0.1.0 .
# Stage 1 builds a virtualenv with the CPU torch wheel; stage 2 copies only the
# virtualenv onto a slim runtime and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, so that code changes reuse the cached layer.
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install -r /tmp/requirements.txt
COPY musicrl ./musicrl
COPY serving ./serving
COPY reward_service ./reward_service
COPY feedback_consumer ./feedback_consumer
COPY finetune_worker ./finetune_worker
COPY loadtests ./loadtests
RUN pip install --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 musicrl && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home musicrl
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    OMP_NUM_THREADS=1
USER 10001:10001
EXPOSE 9102
ENTRYPOINT ["musicrl"]
CMD ["consumer", "run"]

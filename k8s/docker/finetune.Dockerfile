# The finetune worker (reward-model training, RL finetuning, gate, publish, hot swap).
# One Dockerfile, three accelerator builds selected by build arguments:
#   CPU:  docker build -f k8s/docker/finetune.Dockerfile -t ghcr.io/musicrl/finetune:0.1.0 .
#   CUDA: docker build -f k8s/docker/finetune.Dockerfile \
#           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 --build-arg EXTRAS=gpu \
#           -t ghcr.io/musicrl/finetune:0.1.0-cuda12.4 .
#   TPU:  docker build -f k8s/docker/finetune.Dockerfile --build-arg EXTRAS=tpu \
#           -t ghcr.io/musicrl/finetune:0.1.0-tpu .   (torch_xla wheels, see docs/deploy.md)
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
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
RUN pip install --no-deps ".${EXTRAS:+[$EXTRAS]}" && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; fi

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 musicrl && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home musicrl
COPY --from=build /opt/venv /opt/venv
# The committed default models, published to an empty registry at bootstrap (docs/deploy.md).
COPY checkpoints /opt/musicrl/checkpoints
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1
USER 10001:10001
ENTRYPOINT ["musicrl"]
CMD ["finetune", "--help"]

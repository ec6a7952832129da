#!/usr/bin/env bash
# Build (and optionally push) the project image from infra/Dockerfile, tagged with the package version.
#   infra/build_image.sh                    # vidscale:<version>
#   REGISTRY=ghcr.io/me/ PUSH=1 infra/build_image.sh
# The manifests in infra/ name this image; retag them if you push to a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
IMAGE="${REGISTRY:-}vidscale:${VERSION}"
docker build -f infra/Dockerfile -t "$IMAGE" .
echo "built $IMAGE"
if [ "${PUSH:-0}" = 1 ]; then docker push "$IMAGE"; fi

#!/usr/bin/env bash
# Build a qoda_hvd image (docker/Dockerfile) from this checkout.
#
# It prepares what the image build needs beside the repository's files and sends exactly that as
# the build context (no .venv, no .git, nothing git ignores, except the two folders below):
#   docker/wheelhouse/wheels/  the host's Horovod/mpi4py wheel cache (launch/install.sh's
#                              ~/.cache/qoda_hvd/wheels layout), so the image installs the wheel
#                              `make setup` already built instead of compiling Horovod again
#   docker/wheelhouse/extra/   wheels given with --wheel (e.g. a torch CPU wheel) for pip
#   docker/certs/              extra CA certificates given with --ca (TLS-intercepting proxy,
#                              private index)
# Both folders are refilled on every run.
#
# Usage: docker/build.sh [options] [-- extra docker build arguments]
#   --flavour cpu|gpu          (cpu)
#   --base IMAGE               base image (cpu: debian:bookworm;
#                              gpu: nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04)
#   --tag TAG                  (qoda-hvd:<flavour>)
#   --torch-spec SPEC          pip arguments for torch (cpu: torch==2.13.0 from the PyTorch CPU
#                              index, or the torch wheel given with --wheel;
#                              gpu: torch==2.13.0 from https://download.pytorch.org/whl/cu128)
#   --wheel FILE               add a wheel to docker/wheelhouse/extra (repeatable)
#   --wheel-cache DIR|none     Horovod/mpi4py wheel cache to reuse
#                              (QODA_WHEEL_CACHE or ~/.cache/qoda_hvd/wheels)
#   --ca FILE|DIR              extra CA certificate(s), PEM (repeatable)
#   --pip-index-url URL        --pip-extra-index-url URL  --pip-trusted-host HOST
#                              (default: the host's PIP_INDEX_URL / PIP_EXTRA_INDEX_URL /
#                              PIP_TRUSTED_HOST, leaving out file: URLs, which only the host has)
#   --cuda-cc-list LIST        gpu: compute capabilities for Horovod's kernels (80,86,89,90)
#   --network MODE             docker build --network (e.g. host)
#   --no-cache                 docker build --no-cache
# Environment: DOCKER (the docker command, default docker), DOCKER_HOST as usual.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER=${DOCKER:-docker}
say() { printf '\033[1m[docker-build]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[docker-build] error:\033[0m %s\n' "$*" >&2; exit 2; }

flavour=cpu base="" tag="" torch_spec="" cc_list="" network="" no_cache=0
wheel_cache=${QODA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qoda_hvd/wheels}
wheels=() cas=()
drop_file_urls() {  # keep the URLs pip inside the image can reach
  local u out=()
  for u in $1; do case "$u" in file:*|/*) ;; *) out+=("$u") ;; esac; done
  echo "${out[*]:-}"
}
index_url=$(drop_file_urls "${PIP_INDEX_URL:-}")
extra_index_url=$(drop_file_urls "${PIP_EXTRA_INDEX_URL:-}")
trusted_host=${PIP_TRUSTED_HOST:-}
extra_args=()

need() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --flavour|--flavor) need "$@"; flavour=$2; shift 2 ;;
    --base) need "$@"; base=$2; shift 2 ;;
    --tag) need "$@"; tag=$2; shift 2 ;;
    --torch-spec) need "$@"; torch_spec=$2; shift 2 ;;
    --wheel) need "$@"; wheels+=("$2"); shift 2 ;;
    --wheel-cache) need "$@"; wheel_cache=$2; shift 2 ;;
    --ca) need "$@"; cas+=("$2"); shift 2 ;;
    --pip-index-url) need "$@"; index_url=$2; shift 2 ;;
    --pip-extra-index-url) need "$@"; extra_index_url=$2; shift 2 ;;
    --pip-trusted-host) need "$@"; trusted_host=$2; shift 2 ;;
    --cuda-cc-list) need "$@"; cc_list=$2; shift 2 ;;
    --network) need "$@"; network=$2; shift 2 ;;
    --no-cache) no_cache=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra_args=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

case "$flavour" in
  cpu) base=${base:-debian:bookworm}
       default_torch="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" ;;
  gpu) base=${base:-nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04}
       default_torch="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ;;
  *) die "--flavour must be cpu or gpu, got '$flavour'" ;;
esac
tag=${tag:-qoda-hvd:$flavour}
command -v "$DOCKER" >/dev/null 2>&1 || die "'$DOCKER' not found (set DOCKER to the docker client)"

# --- wheelhouse and certificates --------------------------------------------------------------
WH="$ROOT/docker/wheelhouse" CERTS="$ROOT/docker/certs"
mkdir -p "$WH/wheels" "$WH/extra" "$CERTS"
rm -rf "${WH:?}/wheels/"* "${WH:?}/extra/"*
find "$CERTS" -mindepth 1 ! -name README.md -delete
link_or_copy() { cp -l "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
if [ "$wheel_cache" != none ] && [ -d "$wheel_cache" ]; then
  for d in "$wheel_cache"/horovod-* "$wheel_cache"/mpi4py-*; do
    ls "$d"/*.whl >/dev/null 2>&1 || continue
    mkdir -p "$WH/wheels/$(basename "$d")"
    for w in "$d"/*.whl; do link_or_copy "$w" "$WH/wheels/$(basename "$d")/"; done
    say "wheel cache: $(basename "$d")"
  done
fi
torch_wheel=""
for w in "${wheels[@]}"; do
  [ -f "$w" ] && [[ "$w" == *.whl ]] || die "--wheel $w: not a .whl file"
  link_or_copy "$w" "$WH/extra/"
  case "$(basename "$w")" in torch-*) torch_wheel=$(basename "$w") ;; esac
done
for c in "${cas[@]}"; do
  if [ -d "$c" ]; then
    found=0
    for f in "$c"/*.crt "$c"/*.pem; do [ -f "$f" ] && { cp "$f" "$CERTS/"; found=1; }; done
    [ "$found" = 1 ] || die "--ca $c: no *.crt or *.pem in it"
  elif [ -f "$c" ]; then
    grep -q 'BEGIN CERTIFICATE' "$c" || die "--ca $c: no PEM certificate in it"
    n=$(ls "$CERTS" | grep -c -v README.md || true)
    cp "$c" "$CERTS/extra-$n-$(basename "${c%.*}").crt"
  else
    die "--ca $c: no such file or folder"
  fi
done
if [ -z "$torch_spec" ]; then
  if [ -n "$torch_wheel" ]; then
    # torch-2.13.0+cpu-cp311-... -> torch==2.13.0+cpu, found through the wheelhouse
    torch_spec="torch==$(echo "$torch_wheel" | cut -d- -f2)"
  else
    torch_spec=$default_torch
  fi
fi

# --- build context: the checkout's files plus the two prepared folders ------------------------
list_context() {
  cd "$ROOT"
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard
  else
    find . -path ./.git -prune -o -path ./.venv -prune -o -name __pycache__ -prune \
      -o -name '*.egg-info' -prune -o -path ./docker/wheelhouse -prune -o -path ./docker/certs -prune \
      -o -type f -print0 | sed -z 's|^\./||'
  fi
  find docker/wheelhouse docker/certs -type f -print0
}
build_args=(--build-arg "FLAVOUR=$flavour" --build-arg "BASE_IMAGE=$base"
            --build-arg "TORCH_SPEC=$torch_spec"
            --build-arg "PIP_INDEX_URL_ARG=$index_url" --build-arg "PIP_EXTRA_INDEX_URL_ARG=$extra_index_url"
            --build-arg "PIP_TRUSTED_HOST_ARG=$trusted_host")
[ -n "$cc_list" ] && build_args+=(--build-arg "HOROVOD_BUILD_CUDA_CC_LIST=$cc_list")
[ -n "$network" ] && build_args+=(--network "$network")
[ "$no_cache" = 1 ] && build_args+=(--no-cache)
say "building $tag: flavour $flavour, base $base, torch '$torch_spec'"
[ -n "$index_url$extra_index_url" ] && say "pip indexes: ${index_url:-PyPI} ${extra_index_url}"
t0=$SECONDS
( cd "$ROOT" && list_context | sort -zu | while IFS= read -r -d '' f; do
    [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done \
  | tar --null --no-recursion -T - -cf - ) \
  | "$DOCKER" build -f docker/Dockerfile -t "$tag" "${build_args[@]}" "${extra_args[@]}" -
say "built $tag in $((SECONDS - t0)) s"

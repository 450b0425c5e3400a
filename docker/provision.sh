#!/usr/bin/env bash
# Provision a qoda_hvd image. Runs inside `docker build` (see docker/Dockerfile) in two phases so
# the slow system layer stays cached while the source changes:
#
#   provision.sh system   OS packages (Debian or Ubuntu), extra CA certificates, sshd
#   provision.sh python   everything else through launch/install.sh, the README's own set-up
#
# It adds nothing to launch/install.sh: it only feeds it the image's knobs (VENV, QODA_WHEEL_CACHE,
# QODA_TORCH_SPEC, QODA_HOROVOD_GPU, pip settings) and checks the result.
#
# Environment (set by the Dockerfile from its build args):
#   FLAVOUR=cpu|gpu            gpu: Horovod must come out with NCCL
#   QODA_TORCH_SPEC            pip arguments for torch
#   QODA_PIP_INDEX_URL, QODA_PIP_EXTRA_INDEX_URL, QODA_PIP_TRUSTED_HOST   private indexes
#   QODA_EXTRA_CA_DIR          folder of extra CA certificates (*.crt / *.pem), may be empty
#   QODA_WHEELHOUSE            folder with wheels/ (Horovod/mpi4py wheel cache, install.sh's
#                              layout) and extra/ (any wheels pip may take, e.g. torch)
set -euo pipefail

say() { printf '\033[1m[image]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[image] error:\033[0m %s\n' "$*" >&2; exit 1; }

FLAVOUR=${FLAVOUR:-cpu}
case "$FLAVOUR" in cpu|gpu) ;; *) die "FLAVOUR must be cpu or gpu, got '$FLAVOUR'" ;; esac
QODA_EXTRA_CA_DIR=${QODA_EXTRA_CA_DIR:-/tmp/qoda-certs}
QODA_WHEELHOUSE=${QODA_WHEELHOUSE:-/opt/qoda_hvd/docker/wheelhouse}

# Extra CA certificates (a TLS-intercepting proxy's, a private index's) go into the system store,
# which apt (https sources), pip (PIP_CERT) and Python's ssl (SSL_CERT_FILE) then all use.
add_extra_certs() {
  local n total=0 f
  mkdir -p /usr/local/share/ca-certificates/qoda-extra
  for f in "$QODA_EXTRA_CA_DIR"/*.crt "$QODA_EXTRA_CA_DIR"/*.pem; do
    [ -f "$f" ] || continue
    grep -q 'BEGIN CERTIFICATE' "$f" || die "$f holds no PEM certificate"
    # One certificate per file, as update-ca-certificates and OpenSSL's hashed folder expect
    # (a bundle such as a host's ca-certificates.crt becomes one file per certificate).
    n=$(awk -v out="/usr/local/share/ca-certificates/qoda-extra/$(basename "${f%.*}")" '
          /-----BEGIN CERTIFICATE-----/ { k++; keep = 1 }
          keep { print > (out "-" k ".crt") }
          /-----END CERTIFICATE-----/ { keep = 0; close(out "-" k ".crt") }
          END { print k + 0 }' "$f")
    total=$((total + n))
  done
  if [ "$total" -gt 0 ]; then
    update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed"
    say "added $total extra CA certificate(s) to the system store"
  fi
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

system_phase() {
  # Where ca-certificates is already there (CUDA images: their NVIDIA apt source is https), add
  # the extra certificates before the first apt-get so it works behind an intercepting proxy.
  command -v update-ca-certificates >/dev/null 2>&1 && add_extra_certs
  # dpkg's fsync per file costs minutes on overlay2 and buys nothing in an image layer.
  echo force-unsafe-io >/etc/dpkg/dpkg.cfg.d/qoda-build-unsafe-io
  say "apt-get update"
  apt-get update -qq
  apt_install ca-certificates
  add_extra_certs
  local pkgs=(python3 python3-venv python3-dev build-essential cmake
              libopenmpi-dev openmpi-bin openssh-client openssh-server
              procps iproute2 less)
  say "installing ${pkgs[*]}"
  apt_install "${pkgs[@]}"
  if [ "$FLAVOUR" = gpu ]; then
    # CUDA devel images ship NCCL; say so now rather than after a 10-minute Horovod build.
    ls /usr/lib/x86_64-linux-gnu/libnccl.so* /usr/local/cuda/lib64/libnccl.so* >/dev/null 2>&1 \
      || die "no libnccl.so in this base image: use an NVIDIA CUDA *devel* base (it has libnccl-dev)"
    ls /usr/local/cuda/bin/nvcc >/dev/null 2>&1 || die "no /usr/local/cuda/bin/nvcc: use a CUDA devel base image"
  fi
  # sshd for mpirun/horovodrun across containers; it is started only on request
  # (docker/entrypoint.sh, QODA_SSHD=1) on its own port, with key authentication only.
  mkdir -p /run/sshd /root/.ssh && chmod 700 /root/.ssh
  rm -f /etc/ssh/ssh_host_*   # each container makes its own host keys on first start
  cat >/etc/ssh/sshd_config.d/qoda.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AcceptEnv OMPI_* NCCL_* GLOO_* HOROVOD_* QODA_* UCX_*
CONF
  apt-get clean
  rm -rf /var/lib/apt/lists/* /etc/dpkg/dpkg.cfg.d/qoda-build-unsafe-io
}

python_phase() {
  # pip settings: only what was given (an empty PIP_INDEX_URL would break pip).
  [ -n "${QODA_PIP_INDEX_URL:-}" ] && export PIP_INDEX_URL=$QODA_PIP_INDEX_URL
  [ -n "${QODA_PIP_EXTRA_INDEX_URL:-}" ] && export PIP_EXTRA_INDEX_URL=$QODA_PIP_EXTRA_INDEX_URL
  [ -n "${QODA_PIP_TRUSTED_HOST:-}" ] && export PIP_TRUSTED_HOST=$QODA_PIP_TRUSTED_HOST
  export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-120}
  export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
  if ls "$QODA_WHEELHOUSE"/extra/*.whl >/dev/null 2>&1; then
    export PIP_FIND_LINKS="$QODA_WHEELHOUSE/extra"
    say "wheelhouse: $(cd "$QODA_WHEELHOUSE/extra" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')"
  fi
  export QODA_WHEEL_CACHE="$QODA_WHEELHOUSE/wheels"
  mkdir -p "$QODA_WHEEL_CACHE"
  say "cached Horovod/mpi4py wheels: $(cd "$QODA_WHEEL_CACHE" && ls | tr '\n' ' ')"

  local venv=${VENV:-/opt/qoda_hvd/.venv}
  if [ "$FLAVOUR" = gpu ]; then
    export QODA_HOROVOD_GPU=nccl
    # install.sh refuses a CUDA torch where `nvidia-smi -L` finds no GPU, and a build has none:
    # put the CUDA torch into the venv first, and install.sh keeps any torch >= 2.1.
    if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
    say "installing torch for CUDA: $QODA_TORCH_SPEC"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q $QODA_TORCH_SPEC
    "$venv/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch has no CUDA: " + torch.__version__)'
    # Loading Horovod's CUDA extension at build time (install.sh's import and --check-build)
    # needs libcuda.so.1, which only the host driver provides at run time: use the toolkit's stub
    # for the build, as Horovod's own images do. It is not left in the image.
    mkdir -p /tmp/qoda-cuda-stub
    ln -sf /usr/local/cuda/lib64/stubs/libcuda.so /tmp/qoda-cuda-stub/libcuda.so.1
    export LD_LIBRARY_PATH=/tmp/qoda-cuda-stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    export QODA_HOROVOD_GPU=none
  fi

  VENV=$venv bash /opt/qoda_hvd/launch/install.sh

  local check
  check=$("$venv/bin/horovodrun" --check-build)
  printf '%s\n' "$check"
  if [ "$FLAVOUR" = gpu ]; then
    printf '%s\n' "$check" | grep -q '\[X\] NCCL' || die "Horovod was built without NCCL"
    rm -rf /tmp/qoda-cuda-stub
  fi
  rm -rf /root/.cache/pip
}

case "${1:-}" in
  system) system_phase ;;
  python) python_phase ;;
  *) die "usage: provision.sh system|python" ;;
esac

#!/usr/bin/env bash
# Set up everything qoda_hvd needs, idempotently: system OpenMPI, a virtual environment, torch,
# Horovod 0.28.1 (built from the PyPI sdist with upstream's C++17 fix, wheel cached outside the
# repo), mpi4py on the system MPI, and qoda_hvd itself (editable, with its test extra).
#
# A second run with everything in place finishes in seconds: each step checks the real state
# (an import, a version) before it does anything.
#
# Environment knobs (all optional):
#   VENV=.venv                    where the virtual environment lives
#   PYTHON=python3                interpreter the venv is made from
#   QODA_SYSTEM_SITE_PACKAGES=1   let the venv see the interpreter's packages (use your own torch,
#                                 e.g. inside an NGC container or conda env)
#   QODA_TORCH_SPEC="torch==2.13.0"  what to pip-install when no torch >= 2.1 is importable; a GPU
#                                 user names a CUDA build here, e.g.
#                                 "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   QODA_WHEEL_CACHE=~/.cache/qoda_hvd/wheels   where built Horovod wheels are kept
#   QODA_HOROVOD_GPU=auto|nccl|none  NCCL operations when CUDA and NCCL are present (auto)
set -euo pipefail

HOROVOD_VERSION=0.28.1
# sha256 of horovod-0.28.1.tar.gz on PyPI: the source we patch must be the source we checked.
HOROVOD_SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
TORCH_MIN=2.1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
QODA_TORCH_SPEC=${QODA_TORCH_SPEC:-torch==2.13.0}
QODA_WHEEL_CACHE=${QODA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qoda_hvd/wheels}
QODA_HOROVOD_GPU=${QODA_HOROVOD_GPU:-auto}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }
T0=$SECONDS

# Run a long command with its output in a log file and a heartbeat line, so a user sees progress
# and, on failure, the end of the log.
run_logged() {
  local what=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  local pid=$! start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 10
    kill -0 "$pid" 2>/dev/null || break
    local last
    last=$(grep -E '^\[ *[0-9]+%\]' "$log" 2>/dev/null | tail -n 1 | cut -c1-90 || true)
    say "  $what: $((SECONDS - start)) s ${last:+| $last}"
  done
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    die "$what failed; full log: $log"
  fi
}

# --- 1. OpenMPI from Debian -------------------------------------------------------------------
if ! command -v mpicxx >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "mpicxx not found and no apt-get: install OpenMPI (mpicxx, mpirun) and re-run"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  say "installing OpenMPI from Debian (libopenmpi-dev openmpi-bin)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    libopenmpi-dev openmpi-bin openssh-client >/dev/null
fi
say "MPI: $(mpirun --version 2>/dev/null | head -n 1)"

# --- 2. virtual environment -------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  venv_args=()
  [ "${QODA_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && venv_args+=(--system-site-packages)
  "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c 'import setuptools, wheel' 2>/dev/null || "${PIP[@]}" install -q --upgrade pip setuptools wheel

# --- 3. torch ---------------------------------------------------------------------------------
torch_version() {
  "$PY" - "$TORCH_MIN" <<'PYEOF' 2>/dev/null
import sys
try:
    import torch
except Exception:
    sys.exit(1)
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
want = tuple(int(x) for x in sys.argv[1].split("."))
print(torch.__version__)
sys.exit(0 if v >= want else 2)
PYEOF
}
if TV=$(torch_version); then
  say "torch $TV already installed: keeping it"
else
  say "installing $QODA_TORCH_SPEC"
  has_gpu=0; command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && has_gpu=1
  # shellcheck disable=SC2086
  if [ "$has_gpu" = 0 ]; then
    # Never pull several GB of CUDA packages onto a CPU-only machine unasked: look at what pip
    # would install first.
    report=$("${PIP[@]}" install --dry-run --quiet --report - $QODA_TORCH_SPEC 2>/dev/null || true)
    if printf '%s' "$report" | grep -q '"name": "nvidia-'; then
      die "no GPU here, and '$QODA_TORCH_SPEC' resolves to a CUDA build of torch (several GB).
       Point QODA_TORCH_SPEC at a CPU build, e.g.
       QODA_TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu' make setup"
    fi
  fi
  # shellcheck disable=SC2086
  # numpy with it: torch imports it when present and warns when not.
  run_logged "pip install torch" "$VENV/torch-install.log" "${PIP[@]}" install $QODA_TORCH_SPEC numpy
  TV=$(torch_version) || die "torch still not importable (>= $TORCH_MIN) after installing $QODA_TORCH_SPEC"
  say "torch $TV installed"
fi

# --- 4. Horovod -------------------------------------------------------------------------------
horovod_ok() {
  "$PY" -c "import horovod, horovod.torch; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null
}
if horovod_ok; then
  say "Horovod $HOROVOD_VERSION already installed"
else
  "${PIP[@]}" install -q cloudpickle psutil pyyaml packaging cffi
  CUDA_TAG=cpu
  TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
  GPU_OPS=""
  if [ -n "$TORCH_CUDA" ] && [ "$QODA_HOROVOD_GPU" != none ]; then
    nccl_found=0
    for d in ${HOROVOD_NCCL_HOME:-} /usr /usr/local/cuda /usr/local/nccl; do
      [ -n "$d" ] && ls "$d"/lib*/libnccl.so* "$d"/lib/x86_64-linux-gnu/libnccl.so* >/dev/null 2>&1 && nccl_found=1
    done
    if [ "$nccl_found" = 1 ] || [ "$QODA_HOROVOD_GPU" = nccl ]; then
      GPU_OPS=NCCL; CUDA_TAG="cu${TORCH_CUDA//./}-nccl"
    else
      say "torch has CUDA $TORCH_CUDA but no libnccl was found: building Horovod without NCCL (set HOROVOD_NCCL_HOME to use it)"
      CUDA_TAG="cu${TORCH_CUDA//./}"
    fi
  fi
  PYV=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  KEY="horovod-$HOROVOD_VERSION-torch${TV%%+*}-$PYV-$CUDA_TAG"
  CACHE_DIR="$QODA_WHEEL_CACHE/$KEY"
  WHEEL=$(ls "$CACHE_DIR"/horovod-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$WHEEL" ]; then
    say "building Horovod $HOROVOD_VERSION from source: PyPI has only its sdist, which compiles"
    say "  its C++ core (MPI, Gloo, the torch extension). This takes about 6 minutes on 2 cores,"
    say "  once: the wheel is cached in $CACHE_DIR"
    BUILD=$(mktemp -d "${TMPDIR:-/tmp}/qoda-horovod-build.XXXXXX")
    trap 'rm -rf "$BUILD"' EXIT
    "${PIP[@]}" download -q --no-deps --no-binary=:all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
    echo "$HOROVOD_SDIST_SHA256  $BUILD/horovod-$HOROVOD_VERSION.tar.gz" | sha256sum -c --quiet - \
      || die "horovod-$HOROVOD_VERSION.tar.gz does not match its known sha256"
    tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
    SRC="$BUILD/horovod-$HOROVOD_VERSION"
    # Upstream's C++17 fix (horovod PR #3998, unreleased): torch >= 2.1 headers need C++17, and
    # 0.28.1 pins C++14 in these two places.
    sed -i 's/^set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt"
    sed -i 's/^    set(CMAKE_CXX_STANDARD 14)/    set(CMAKE_CXX_STANDARD 17)/' "$SRC/horovod/torch/CMakeLists.txt"
    grep -q '^set(CMAKE_CXX_STANDARD 17)' "$SRC/CMakeLists.txt" \
      && grep -q 'set(CMAKE_CXX_STANDARD 17)' "$SRC/horovod/torch/CMakeLists.txt" \
      || die "could not apply the C++17 fix to the Horovod sources"
    mkdir -p "$CACHE_DIR"
    (
      cd "$SRC"
      export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI \
        MAKEFLAGS="-j$(nproc)"
      [ -n "$GPU_OPS" ] && export HOROVOD_GPU_OPERATIONS=$GPU_OPS
      run_logged "Horovod build" "$BUILD/build.log" \
        "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$CACHE_DIR" .
    )
    WHEEL=$(ls "$CACHE_DIR"/horovod-*.whl | head -n 1)
  else
    say "using cached Horovod wheel $WHEEL"
  fi
  "${PIP[@]}" install -q --force-reinstall --no-deps "$WHEEL"
  horovod_ok || die "Horovod installed but 'import horovod.torch' fails"
fi
CHECK=$("$VENV/bin/horovodrun" --check-build)
printf '%s\n' "$CHECK" | grep -q '\[X\] PyTorch' || die "horovodrun --check-build shows no PyTorch:
$CHECK"
printf '%s\n' "$CHECK" | grep -q '\[X\] MPI' || die "horovodrun --check-build shows no MPI controller:
$CHECK"
printf '%s\n' "$CHECK" | grep -q '\[X\] Gloo' || die "horovodrun --check-build shows no Gloo controller:
$CHECK"
say "Horovod $HOROVOD_VERSION: PyTorch, MPI and Gloo available"

# --- 5. mpi4py on the system MPI --------------------------------------------------------------
mpi4py_ok() {
  "$PY" -c 'from mpi4py import MPI; import sys; sys.exit(0 if "Open MPI" in MPI.Get_library_version() else 1)' 2>/dev/null
}
if ! mpi4py_ok; then
  # Built from source so it links the system's libmpi (not an MPI from a binary wheel); the wheel
  # is cached, keyed by Python and the MPI library, like Horovod's.
  MPI_KEY=$(mpirun --version 2>/dev/null | head -n 1 | tr -c 'A-Za-z0-9.\n' '-' | tr -s '-')
  PYV=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  M_CACHE="$QODA_WHEEL_CACHE/mpi4py-$PYV-$MPI_KEY"
  M_WHEEL=$(ls "$M_CACHE"/mpi4py-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$M_WHEEL" ]; then
    say "building mpi4py against the system MPI ($(command -v mpicc)); about 2 minutes, once"
    mkdir -p "$M_CACHE"
    run_logged "mpi4py build" "$VENV/mpi4py-build.log" \
      env MPICC="$(command -v mpicc)" "${PIP[@]}" wheel -v --no-binary=mpi4py --no-deps -w "$M_CACHE" "mpi4py>=3.1"
    M_WHEEL=$(ls "$M_CACHE"/mpi4py-*.whl | head -n 1)
  fi
  "${PIP[@]}" install -q --force-reinstall --no-deps "$M_WHEEL"
  mpi4py_ok || die "mpi4py does not run on the system Open MPI"
fi
say "mpi4py $("$PY" -c 'import mpi4py; print(mpi4py.__version__)') on $("$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0][:40])')"

# --- 6. qoda_hvd itself -----------------------------------------------------------------------
STAMP="$VENV/.qoda_hvd-installed"
SIG=$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$SIG:$ROOT" ] || ! "$PY" -c 'import qoda_hvd' 2>/dev/null; then
  say "installing qoda_hvd (editable, with its test extra)"
  "${PIP[@]}" install -q --no-build-isolation -e "$ROOT[test]"
  echo "$SIG:$ROOT" >"$STAMP"
fi
say "ready in $((SECONDS - T0)) s: $VENV/bin/python, qoda_hvd $("$PY" -c 'import qoda_hvd; print(qoda_hvd.__version__)')"

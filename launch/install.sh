#!/usr/bin/env bash
# Set up everything qoda_hvd needs, idempotently: system OpenMPI, a virtual environment, torch,
# Horovod 0.28.1 (built from the PyPI sdist with upstream's C++17 fix, wheel cached outside the
# repo), mpi4py on the system MPI, qoda_hvd itself (editable, with its test and examples extras),
# and qoda_hvd's CPU codec kernels compiled into numba's cache.
#
# A second run with everything in place finishes in seconds: each step checks the real state
# (an import, a version) before it does anything.
#
# A first run overlaps what does not depend on each other (each step's time is printed, and a
# summary at the end):
#   apt (Open MPI)      || venv -> torch, and the Horovod sdist download
#   Horovod build (CPU) || mpi4py (PyPI's binary wheel, checked on the system MPI with a 2-rank
#                          job; built from source only if that fails) -> qoda_hvd (editable)
#   then: Horovod's wheel into the venv -> the codec kernels compiled
# Only one pip at a time writes the venv: the Horovod build writes its wheel to the cache, not
# the venv, so it runs beside the mpi4py/qoda_hvd installs; its wheel is installed after them.
#
# Environment knobs (all optional):
#   VENV=.venv                    where the virtual environment lives
#   PYTHON=python3                interpreter the venv is made from
#   QODA_SYSTEM_SITE_PACKAGES=1   let the venv see the interpreter's packages (use your own torch,
#                                 e.g. inside an NGC container or conda env)
#   QODA_TORCH_SPEC="torch==2.13.0"  what to pip-install when no torch >= 2.1 is importable; a GPU
#                                 user names a CUDA build here, e.g.
#                                 "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   QODA_WHEEL_CACHE=~/.cache/qoda_hvd/wheels   where built Horovod (and mpi4py) wheels are kept
#   QODA_HOROVOD_GPU=auto|nccl|none  NCCL operations when CUDA and NCCL are present (auto)
#   QODA_MPI4PY_SOURCE=1          build mpi4py from source against the system MPI instead of
#                                 trying PyPI's binary wheel first
#   QODA_EXTRAS=test,examples     qoda_hvd's extras: test (pytest, Triton's interpreter) and
#                                 examples (matplotlib, scikit-learn: the plots, tables and digits
#                                 of examples/ and bench/); QODA_EXTRAS=test leaves out the latter
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
QODA_EXTRAS=${QODA_EXTRAS-test,examples}
JOBS=$(nproc 2>/dev/null || echo 2)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }
T0=$SECONDS
# Logs of the steps that run in the background, and the Horovod build tree; kept on failure.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qoda-setup.XXXXXX")
BG_PIDS=()
cleanup() {
  local rc=$?
  for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ "$rc" = 0 ]; then rm -rf "$WORK"; else echo "[setup] logs kept in $WORK" >&2; fi
}
trap cleanup EXIT

# Step times for the summary line: "name seconds" pairs.
TIMES=()
took() { TIMES+=("$1 $2"); }

# Wait for a background step; on failure show the end of its log and stop.
wait_step() {
  local what=$1 pid=$2 log=$3
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    die "$what failed; full log: $log"
  fi
}

# Run a long command in the background with its output in a log file and a heartbeat line every
# 10 s (the build's progress when it shows one), so a user sees it move; on failure the end of
# the log. Extra pids in WATCH are waited for too (steps running alongside).
run_logged() {
  local what=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  local pid=$! start=$SECONDS
  BG_PIDS+=("$pid")
  while kill -0 "$pid" 2>/dev/null; do
    sleep 10
    kill -0 "$pid" 2>/dev/null || break
    local last
    # CMake's "[ 45%] Building CXX object ..." lines, indented by pip.
    last=$(grep -E '^ *\[ *[0-9]+%\]' "$log" 2>/dev/null | tail -n 1 | sed 's/^ *//' | cut -c1-90 || true)
    say "  $what: $((SECONDS - start)) s ${last:+| $last}"
  done
  wait_step "$what" "$pid" "$log"
}

# --- 1. OpenMPI from Debian (in the background: only the Horovod build and mpi4py need it) ----
APT_PID=""
if ! command -v mpicxx >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "mpicxx not found and no apt-get: install OpenMPI (mpicxx, mpirun) and re-run"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  say "installing OpenMPI from Debian (libopenmpi-dev openmpi-bin), alongside the next steps"
  (
    s=$SECONDS
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      libopenmpi-dev openmpi-bin openssh-client
    echo "apt_seconds $((SECONDS - s))"
  ) >"$WORK/apt.log" 2>&1 &
  APT_PID=$!
  BG_PIDS+=("$APT_PID")
fi
wait_apt() {
  [ -n "$APT_PID" ] || return 0
  wait_step "apt-get install OpenMPI" "$APT_PID" "$WORK/apt.log"
  local s; s=$(awk '/^apt_seconds/{print $2}' "$WORK/apt.log")
  took "apt(OpenMPI)" "${s:-?}"
  say "OpenMPI installed (${s:-?} s)"
  APT_PID=""
}

# --- 2. virtual environment -------------------------------------------------------------------
s=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  venv_args=()
  [ "${QODA_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && venv_args+=(--system-site-packages)
  "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c 'import setuptools, wheel' 2>/dev/null || "${PIP[@]}" install -q --upgrade pip setuptools wheel
took venv $((SECONDS - s))
PYV=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# Horovod importable at our version, with its MPI and Gloo controllers (what --check-build shows;
# that command takes seconds, so it runs only after an install).
horovod_ok() {
  "$PY" -c "import horovod, horovod.torch as hvd; assert horovod.__version__ == '$HOROVOD_VERSION'
assert hvd.mpi_built() and hvd.gloo_built()" 2>/dev/null
}
# Horovod's source, fetched and checked while torch installs (only when it will be built).
SDIST_PID=""
BUILD="$WORK/horovod"
fetch_sdist() {
  mkdir -p "$BUILD"
  "${PIP[@]}" download -q --no-deps --no-binary=:all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
  echo "$HOROVOD_SDIST_SHA256  $BUILD/horovod-$HOROVOD_VERSION.tar.gz" | sha256sum -c --quiet - \
    || { echo "horovod-$HOROVOD_VERSION.tar.gz does not match its known sha256" >&2; return 1; }
  tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
}
if ! horovod_ok 2>/dev/null && ! ls "$QODA_WHEEL_CACHE"/horovod-"$HOROVOD_VERSION"-*/horovod-*.whl >/dev/null 2>&1; then
  fetch_sdist >"$WORK/sdist.log" 2>&1 &
  SDIST_PID=$!
  BG_PIDS+=("$SDIST_PID")
fi

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
s=$SECONDS
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
  run_logged "pip install torch" "$WORK/torch-install.log" "${PIP[@]}" install $QODA_TORCH_SPEC numpy
  TV=$(torch_version) || die "torch still not importable (>= $TORCH_MIN) after installing $QODA_TORCH_SPEC"
  say "torch $TV installed ($((SECONDS - s)) s)"
fi
took torch $((SECONDS - s))
wait_apt
say "MPI: $(mpirun --version 2>/dev/null | head -n 1)"
MPI_IMPL="Open MPI"; mpirun --version 2>/dev/null | head -n 1 | grep -q "Open MPI" || MPI_IMPL="MPICH"

# --- 4 and 5. mpi4py on the system MPI, then qoda_hvd (editable): alongside Horovod's build ----
# The 2-rank job that says an mpi4py runs on the system MPI: both ranks see a world of 2 and the
# right sum (an mpi4py on another MPI starts two singletons instead).
mpi4py_job_ok() {
  local args=(-np 2)
  [ "$MPI_IMPL" = "Open MPI" ] && args+=(--oversubscribe --bind-to none)
  local out
  out=$(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 60 \
        mpirun "${args[@]}" "$PY" -c '
from mpi4py import MPI
c = MPI.COMM_WORLD
s = c.allreduce(c.Get_rank() + 1)
print("mpi4py-job", c.Get_size(), s, MPI.Get_library_version().splitlines()[0])' 2>&1) || { echo "$out"; return 1; }
  echo "$out"
  [ "$(printf '%s\n' "$out" | grep -c "^mpi4py-job 2 3 .*$MPI_IMPL")" = 2 ]
}
# Which MPI library an installed mpi4py loads; without MPI_Init (a second or more each time).
mpi4py_library() {
  "$PY" -c 'import mpi4py; mpi4py.rc.initialize = False
from mpi4py import MPI; print(mpi4py.__version__, "on", MPI.Get_library_version().splitlines()[0][:40])' 2>/dev/null
}
mpi4py_ok() { mpi4py_library | grep -q "$MPI_IMPL"; }
install_mpi4py() {
  local s=$SECONDS
  MPI_KEY=$(mpirun --version 2>/dev/null | head -n 1 | tr -c 'A-Za-z0-9.\n' '-' | tr -s '-')
  M_CACHE="$QODA_WHEEL_CACHE/mpi4py-$PYV-$MPI_KEY"
  M_WHEEL=$(ls "$M_CACHE"/mpi4py-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$M_WHEEL" ]; then
    "${PIP[@]}" install -q --force-reinstall --no-deps "$M_WHEEL"
    echo "mpi4py: cached source-built wheel $M_WHEEL"
  elif [ "${QODA_MPI4PY_SOURCE:-0}" != 1 ] \
       && "${PIP[@]}" install -q --only-binary=mpi4py "mpi4py>=3.1" && mpi4py_ok && mpi4py_job_ok; then
    # PyPI's wheels (mpi4py >= 4) carry one extension per MPI ABI and load the system libmpi at
    # run time: nothing to compile when the check above passes.
    echo "mpi4py: PyPI's binary wheel, runs on the system $MPI_IMPL (2-rank job passed)"
  else
    echo "mpi4py: building from source against $(command -v mpicc) (binary wheel not used)"
    "${PIP[@]}" uninstall -q -y mpi4py >/dev/null 2>&1 || true
    mkdir -p "$M_CACHE"
    env MPICC="$(command -v mpicc)" "${PIP[@]}" wheel -v --no-binary=mpi4py --no-deps -w "$M_CACHE" "mpi4py>=3.1"
    M_WHEEL=$(ls "$M_CACHE"/mpi4py-*.whl | head -n 1)
    "${PIP[@]}" install -q --force-reinstall --no-deps "$M_WHEEL"
    mpi4py_ok && mpi4py_job_ok || { echo "mpi4py does not run on the system $MPI_IMPL"; return 1; }
  fi
  echo "mpi4py_seconds $((SECONDS - s))"
}
STAMP="$VENV/.qoda_hvd-installed"
SIG=$( { cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" 2>/dev/null; echo "extras $QODA_EXTRAS"; } \
      | sha256sum | cut -c1-16)
# find_spec, not an import: importing qoda_hvd imports torch (seconds), and this runs every time.
qoda_needed() {
  [ "$(cat "$STAMP" 2>/dev/null)" != "$SIG:$ROOT" ] \
    || ! "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("qoda_hvd") else 1)' 2>/dev/null
}
install_qoda() {
  local s=$SECONDS
  "${PIP[@]}" install -q --no-build-isolation -e "$ROOT${QODA_EXTRAS:+[$QODA_EXTRAS]}"
  echo "qoda_seconds $((SECONDS - s))"
}
HOROVOD_OK=0
horovod_ok && HOROVOD_OK=1
# Horovod's runtime dependencies go in before the steps alongside start: from then on the only
# pip writing the venv is theirs (two pips in one venv can leave it inconsistent).
if [ "$HOROVOD_OK" = 0 ]; then
  "${PIP[@]}" install -q cloudpickle psutil pyyaml packaging cffi
fi
SIDE_PID=""
QODA_DONE=0
side_steps() {
  if ! mpi4py_ok; then install_mpi4py; fi
  if qoda_needed; then install_qoda; fi
}
if ! mpi4py_ok || qoda_needed; then
  say "mpi4py and qoda_hvd: installing alongside (log $WORK/side.log)"
  side_steps >"$WORK/side.log" 2>&1 &
  SIDE_PID=$!
  BG_PIDS+=("$SIDE_PID")
fi

# --- 6. Horovod -------------------------------------------------------------------------------
s=$SECONDS
HOROVOD_WHEEL=""
if [ "$HOROVOD_OK" = 1 ]; then
  say "Horovod $HOROVOD_VERSION already installed"
else
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
  KEY="horovod-$HOROVOD_VERSION-torch${TV%%+*}-$PYV-$CUDA_TAG"
  CACHE_DIR="$QODA_WHEEL_CACHE/$KEY"
  WHEEL=$(ls "$CACHE_DIR"/horovod-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$WHEEL" ]; then
    say "building Horovod $HOROVOD_VERSION from source: PyPI has only its sdist, which compiles"
    say "  its C++ core (MPI, Gloo, the torch extension). About 3 minutes on 2 idle cores, once:"
    say "  the wheel is cached in $CACHE_DIR"
    if [ -n "$SDIST_PID" ]; then
      wait_step "downloading the Horovod sdist" "$SDIST_PID" "$WORK/sdist.log"
    else
      fetch_sdist || die "could not fetch or check the Horovod sdist"
    fi
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
        MAKEFLAGS="-j$JOBS"
      [ -n "$GPU_OPS" ] && export HOROVOD_GPU_OPERATIONS=$GPU_OPS
      run_logged "Horovod build" "$WORK/horovod-build.log" \
        "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$CACHE_DIR" .
    )
    WHEEL=$(ls "$CACHE_DIR"/horovod-*.whl | head -n 1)
    say "Horovod built ($((SECONDS - s)) s)"
  else
    say "using cached Horovod wheel $WHEEL"
  fi
  HOROVOD_WHEEL=$WHEEL
fi
HOROVOD_SECONDS=$((SECONDS - s))

# The steps alongside end before Horovod's wheel goes into the venv (one pip at a time).
if [ -n "$SIDE_PID" ]; then
  [ -n "$HOROVOD_WHEEL" ] && say "waiting for the mpi4py / qoda_hvd installs before installing Horovod's wheel"
  wait_step "mpi4py / qoda_hvd install" "$SIDE_PID" "$WORK/side.log"
  { grep '^mpi4py: ' "$WORK/side.log" || true; } | while IFS= read -r line; do say "$line"; done
  v=$(awk '/^mpi4py_seconds/{print $2}' "$WORK/side.log"); [ -n "$v" ] && took mpi4py "$v"
  v=$(awk '/^qoda_seconds/{print $2}' "$WORK/side.log"); [ -n "$v" ] && { took qoda_hvd "$v"; QODA_DONE=1; }
fi
s=$SECONDS
if [ -n "$HOROVOD_WHEEL" ]; then
  "${PIP[@]}" install -q --force-reinstall --no-deps "$HOROVOD_WHEEL"
  horovod_ok || die "Horovod installed but 'import horovod.torch' fails or lacks MPI/Gloo"
  CHECK=$("$VENV/bin/horovodrun" --check-build)
  printf '%s\n' "$CHECK" | grep -q '\[X\] PyTorch' || die "horovodrun --check-build shows no PyTorch:
$CHECK"
  printf '%s\n' "$CHECK" | grep -q '\[X\] MPI' || die "horovodrun --check-build shows no MPI controller:
$CHECK"
  printf '%s\n' "$CHECK" | grep -q '\[X\] Gloo' || die "horovodrun --check-build shows no Gloo controller:
$CHECK"
  say "Horovod $HOROVOD_VERSION: horovodrun --check-build shows PyTorch, MPI and Gloo"
fi
took Horovod $((HOROVOD_SECONDS + SECONDS - s))

M_LIB=$(mpi4py_library || true)
printf '%s' "$M_LIB" | grep -q "$MPI_IMPL" || die "mpi4py does not load the system $MPI_IMPL (${M_LIB:-not importable})"
say "mpi4py $M_LIB"

# --- 7. qoda_hvd itself (normally done alongside the build above) -----------------------------
if [ "$QODA_DONE" = 0 ] && qoda_needed; then
  s=$SECONDS
  say "installing qoda_hvd (editable, with its test extra)"
  install_qoda >/dev/null
  took qoda_hvd $((SECONDS - s))
fi

# --- 8. the CPU codec kernels, compiled into numba's cache -------------------------------------
# Without this a first run's first quantized step compiles them (15-20 s, measured in a first
# `make demo`). numba keys its cache by the kernels' sources (path, mtime, size), its version and
# Python's; so is this step's stamp, which also names the cache directories it must find filled.
KSTAMP="$VENV/.qoda_hvd-kernels"
KSIG=$( { stat -c '%n %Y %s' "$ROOT/qoda_hvd/kernels/cpu.py" "$ROOT/qoda_hvd/coding/rans.py"
          ls -d "$VENV"/lib/python*/site-packages/numba-*.dist-info 2>/dev/null || true
          echo "${NUMBA_CACHE_DIR:-}"; } | sha256sum | cut -c1-16)
kernels_cached() {
  [ "$(head -n 1 "$KSTAMP" 2>/dev/null)" = "$KSIG" ] || return 1
  local dirs d
  dirs=$(sed -n 2p "$KSTAMP")
  [ -n "$dirs" ] || return 1
  IFS=: read -r -a d <<<"$dirs"
  for dir in "${d[@]}"; do ls "$dir"/*.nbi >/dev/null 2>&1 || return 1; done
}
if ! kernels_cached; then
  s=$SECONDS
  say "compiling qoda_hvd's CPU codec kernels into numba's cache (once; a first run would do it in its first step)"
  out=$("$PY" -c 'from qoda_hvd.demo import compile_kernels; print(compile_kernels())' 2>"$WORK/kernels.log") \
    || { cat "$WORK/kernels.log" >&2; die "compiling the codec kernels failed (log above)"; }
  printf '%s\n%s\n' "$KSIG" "$(printf '%s\n' "$out" | tail -n 1)" >"$KSTAMP"
  took kernels $((SECONDS - s))
  say "kernels compiled ($((SECONDS - s)) s), cached in $(printf '%s\n' "$out" | tail -n 1 | tr ':' ' ')"
fi

# Written last: its presence says the whole stack is in place.
echo "$SIG:$ROOT" >"$STAMP"
summary=""
for t in "${TIMES[@]}"; do summary+="${summary:+, }${t% *} ${t##* } s"; done
say "ready in $((SECONDS - T0)) s ($summary; steps in the background overlap): $VENV/bin/python, qoda_hvd $("$PY" -c 'import importlib.metadata as m; print(m.version("qoda_hvd"))')"

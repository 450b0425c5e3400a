#!/usr/bin/env bash
# CI for the Docker images: start a private dockerd, make a Debian bookworm base image with
# debootstrap (no registry needed), build the CPU image with docker/build.sh, run a 2-rank test
# inside it, then stop the daemon and unmount what it left, on success, failure or interrupt.
#
# Exit status: 0 passed; 1 failed; 77 Docker cannot run here (the reason is the last line on
# stderr, starting "SKIP:"), which tests/test_docker.py turns into a skip.
#
# Only this script's own daemon is touched: its socket, pid file and exec root are under
# $QODA_DOCKER_RUN (/tmp/qoda-docker-ci); it runs with --iptables=false --ip-forward=false
# --bridge=none and every build and container uses --network=host, so the host's network
# configuration is left alone. Images and the build cache persist in $QODA_DOCKER_CACHE/data
# (~/.cache/qoda_hvd/docker/data): a second run reuses the base image and the cached layers.
#
# Environment:
#   QODA_DOCKER_CACHE        data root and logs (~/.cache/qoda_hvd/docker)
#   QODA_DOCKER_RUN          socket, pid file, exec root (/tmp/qoda-docker-ci; keep it short:
#                            unix socket paths under it must stay below 108 bytes)
#   QODA_DOCKER_APT=1        apt-get install docker.io / debootstrap when missing (0: skip instead)
#   QODA_DOCKER_TEST=full    full: after the demo, the 2-rank distributed suite
#                            (tests/test_distributed.py -k mpirun-np2) and an ssh login into the
#                            container's sshd (entry point, QODA_SSHD=1); quick: --check-build
#                            and the demo only
#   QODA_DOCKER_TORCH=torch==2.13.0+cpu   the torch wheel put into the wheelhouse (fetched with
#                            the host's pip configuration, so a local find-links or index works)
#   QODA_DEBIAN_MIRROR       debootstrap mirror (http://deb.debian.org/debian)
#   QODA_DOCKER_CA           CA bundle handed to the image (the host's
#                            /etc/ssl/certs/ca-certificates.crt, which holds a TLS-intercepting
#                            proxy's certificate where there is one); "none" for nothing
#   QODA_DOCKER_SSH_PORT=22422   port of the container's sshd in the full test (host network)
#   QODA_DOCKER_PRUNE=0      1: delete the data root at the end (a cold run every time)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${QODA_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qoda_hvd/docker}
RUN=${QODA_DOCKER_RUN:-/tmp/qoda-docker-ci}
DATA=$CACHE/data EXEC=$RUN/exec SOCK=$RUN/docker.sock PIDFILE=$RUN/dockerd.pid LOG=$CACHE/dockerd.log
BASE_TAG=qoda-base:bookworm IMAGE_TAG=qoda-hvd:cpu
TEST=${QODA_DOCKER_TEST:-full}
TORCH_REQ=${QODA_DOCKER_TORCH:-torch==2.13.0+cpu}
MIRROR=${QODA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
T0=$SECONDS

say() { printf '\033[1m[docker-ci %3d s]\033[0m %s\n' "$((SECONDS - T0))" "$*" >&2; }
fail() { printf '\033[1;31m[docker-ci] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
skip() { printf 'SKIP: %s\n' "$*" >&2; exit 77; }

case "$TEST" in full|quick) ;; *) fail "QODA_DOCKER_TEST must be full or quick, got '$TEST'" ;; esac
[ "$(uname -s)" = Linux ] || skip "Docker CI needs Linux (this is $(uname -s))"
[ "$(id -u)" = 0 ] || skip "Docker CI starts its own dockerd, which needs root (uid is $(id -u))"

# --- tools ------------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "${QODA_DOCKER_APT:-1}" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} (apt-get)"
    apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
      || fail "apt-get install ${missing[*]} failed"
  else
    skip "missing ${missing[*]} (apt-get install ${missing[*]})"
  fi
fi
# The client that came with the daemon speaks its API version for sure.
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker || true)}
[ -n "$DOCKER" ] || skip "no docker client (apt-get install docker.io)"
export DOCKER DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=0
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
dk() { "$DOCKER" "$@"; }

mkdir -p "$CACHE" "$RUN"
exec 9>"$CACHE/ci.lock"
flock -w 900 9 || fail "another docker/ci.sh holds $CACHE/ci.lock"

# --- daemon lifecycle -------------------------------------------------------------------------
unmount_under() {  # deepest first; lazily, as the daemon may have left busy mounts
  local m
  for root in "$@"; do
    findmnt -rn -o TARGET 2>/dev/null | grep -F "$root" | sort -r | while read -r m; do
      case "$m" in "$root"|"$root"/*) umount -l "$m" 2>/dev/null || true ;; esac
    done || true
  done
}
stop_daemon() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = dockerd ]; then
    kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && { say "dockerd $pid did not stop in 30 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  # containerd that this dockerd started (when it did not use a system containerd)
  local cpid
  cpid=$(cat "$EXEC/containerd/containerd.pid" 2>/dev/null || true)
  if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null && [ "$(cat /proc/"$cpid"/comm 2>/dev/null)" = containerd ]; then
    kill -TERM "$cpid" 2>/dev/null || true; sleep 2; kill -KILL "$cpid" 2>/dev/null || true
  fi
  unmount_under "$EXEC" "$DATA"
  rm -f "$PIDFILE" "$SOCK"
}
BOOT=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$BOOT" ] && { unmount_under "$BOOT"; rm -rf "$BOOT"; }
  stop_daemon
  rm -rf "$EXEC" "$RUN/ssh"
  # what build.sh put into the checkout for the build context (a torch wheel, the host's CA
  # bundle): the image has it, and it must not end up in a commit
  rm -rf "$ROOT/docker/wheelhouse/wheels" "$ROOT/docker/wheelhouse/extra"
  find "$ROOT/docker/certs" -mindepth 1 ! -name README.md -delete 2>/dev/null || true
  if [ "${QODA_DOCKER_PRUNE:-0}" = 1 ]; then rm -rf "$DATA"; fi
  say "daemon stopped, mounts released (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_daemon   # a previous run killed outright may have left its daemon
mkdir -p "$DATA" "$EXEC"
say "starting dockerd (data root $DATA, socket $SOCK)"
dockerd --data-root "$DATA" --exec-root "$EXEC" --host "unix://$SOCK" --pidfile "$PIDFILE" \
  --storage-driver=overlay2 --iptables=false --ip-forward=false --bridge=none \
  >"$LOG" 2>&1 &
DPID=$!
for _ in $(seq 1 60); do
  dk version >/dev/null 2>&1 && break
  kill -0 "$DPID" 2>/dev/null || break
  sleep 1
done
if ! dk version >/dev/null 2>&1; then
  tail -n 15 "$LOG" >&2
  skip "dockerd did not start: $(grep -E 'level=(fatal|error)|failed' "$LOG" | tail -n 1 | cut -c1-300)"
fi
say "dockerd $(dk version --format '{{.Server.Version}}') up (pid $DPID)"

# --- base image: debootstrap, imported (no registry is needed) --------------------------------
if dk image inspect "$BASE_TAG" >/dev/null 2>&1; then
  say "base image $BASE_TAG: reused"
else
  BOOT=$(mktemp -d "${TMPDIR:-/tmp}/qoda-debootstrap.XXXXXX")
  say "debootstrap --variant=minbase bookworm ($MIRROR)"
  debootstrap --variant=minbase bookworm "$BOOT/root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -n 20 "$CACHE/debootstrap.log" >&2; fail "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  unmount_under "$BOOT/root"
  tar -C "$BOOT/root" -c . | dk import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$BASE_TAG" >/dev/null || fail "docker import failed"
  rm -rf "$BOOT"; BOOT=""
  say "base image $BASE_TAG imported"
fi
out=$(dk run --rm --network=host "$BASE_TAG" sh -c 'echo container-ok' 2>&1) \
  || skip "dockerd runs but cannot start a container: $(echo "$out" | tail -n 1 | cut -c1-300)"

# --- wheels: the host's Horovod/mpi4py cache (build.sh picks it up) and a CPU torch -----------
cache=${QODA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qoda_hvd/wheels}
ls "$cache"/horovod-*-cpu/*.whl >/dev/null 2>&1 \
  || say "no cached CPU Horovod wheel in $cache: the image compiles Horovod (~6 min; run 'make setup' first)"
TW=$CACHE/torch-wheel
mkdir -p "$TW"
if ! ls "$TW"/torch-*.whl >/dev/null 2>&1 || [ "$(cat "$TW/.req" 2>/dev/null)" != "$TORCH_REQ" ]; then
  rm -f "$TW"/*.whl
  say "fetching $TORCH_REQ for the image (host pip configuration)"
  python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$TW" "$TORCH_REQ" \
    || fail "pip could not fetch $TORCH_REQ; point PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL at a CPU build (https://download.pytorch.org/whl/cpu)"
  echo "$TORCH_REQ" >"$TW/.req"
fi
TORCH_WHEEL=$(ls "$TW"/torch-*.whl | head -n 1)

# --- build ------------------------------------------------------------------------------------
ca_args=()
CA=${QODA_DOCKER_CA:-/etc/ssl/certs/ca-certificates.crt}
[ "$CA" != none ] && [ -f "$CA" ] && ca_args=(--ca "$CA")
say "building $IMAGE_TAG"
t=$SECONDS
"$ROOT/docker/build.sh" --flavour cpu --base "$BASE_TAG" --tag "$IMAGE_TAG" --network host \
  --wheel "$TORCH_WHEEL" "${ca_args[@]}" >"$CACHE/build.log" 2>&1 \
  || { tail -n 40 "$CACHE/build.log" >&2; fail "image build failed (log: $CACHE/build.log)"; }
sed 's/\x1b\[[0-9;]*m//g' "$CACHE/build.log" | grep -E '^\[(image|setup|docker-build)\]|^Step [0-9]+/' \
  | grep -v -E '^Step [0-9]+/[0-9]+ : (ARG|ENV|CMD|ENTRYPOINT|WORKDIR)' >&2 || true
say "built $IMAGE_TAG in $((SECONDS - t)) s ($(dk image inspect --format '{{.Size}}' "$IMAGE_TAG" | awk '{printf "%.2f GB", $1/1e9}'))"
dk image prune -f >/dev/null || true   # layers of earlier builds of the tag

# --- 2-rank test inside the image -------------------------------------------------------------
inner='set -e; horovodrun --check-build | grep -E "\[X\] (PyTorch|MPI|Gloo)"
qoda-hvd demo --steps 20'
ssh_args=()
if [ "$TEST" = full ]; then
  # what an ssh session (mpirun's remote orted) gets: the venv's python and a working Horovod
  inner="$inner
python -m pytest tests/test_distributed.py -q -p no:cacheprovider -k mpirun-np2
$(cat <<'SH'
ssh -o BatchMode=yes 127.0.0.1 'p=$(command -v python) && [ "$p" = /opt/qoda_hvd/.venv/bin/python ] && horovodrun --check-build | grep -q "\[X\] MPI" && echo "ssh into the container: $p, Horovod with MPI"'
SH
)"
  # the entry point's sshd (multi-node set-up, docker/README.md) with a throw-away key
  rm -rf "$RUN/ssh"; mkdir -p "$RUN/ssh"
  dk run --rm --network=none -v "$RUN/ssh:/out" "$IMAGE_TAG" sh -c \
    "ssh-keygen -q -t ed25519 -N '' -C qoda-docker-ci -f /out/id_ed25519 && cp /out/id_ed25519.pub /out/authorized_keys" \
    || fail "could not make an ssh key in $IMAGE_TAG"
  ssh_args=(-e QODA_SSHD=1 -e "QODA_SSH_PORT=${QODA_DOCKER_SSH_PORT:-22422}" -v "$RUN/ssh:/run/qoda-ssh:ro")
fi
what="check-build, 2-rank demo"; [ "$TEST" = full ] && what="$what, 2-rank distributed suite"
say "running in $IMAGE_TAG: $what"
t=$SECONDS
dk run --rm --network=host --shm-size=1g --name "qoda-ci-$$" "${ssh_args[@]}" "$IMAGE_TAG" bash -c "$inner" \
  || fail "the 2-rank test inside $IMAGE_TAG failed"
say "test in the container passed in $((SECONDS - t)) s; docker CI passed in $((SECONDS - T0)) s"

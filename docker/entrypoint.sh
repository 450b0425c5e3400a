#!/usr/bin/env bash
# Container entry point: optionally start sshd (for mpirun / horovodrun across containers), then
# run the command.
#
#   QODA_SSHD=1              start sshd on QODA_SSH_PORT, key authentication only
#   QODA_SSH_PORT=2222       its port (not 22: with host networking the host's sshd has that);
#                            also written as the ssh client's default port, so mpirun and
#                            horovodrun reach the other containers without extra flags
#   QODA_SSH_KEY_DIR=/run/qoda-ssh   folder with id_ed25519 (or id_rsa) and authorized_keys,
#                            mounted read-only; copied to /root/.ssh with the right modes
set -euo pipefail

if [ "${QODA_SSHD:-0}" = 1 ]; then
  port=${QODA_SSH_PORT:-2222}
  case "$port" in ''|*[!0-9]*) echo "QODA_SSH_PORT must be a port number, got '$port'" >&2; exit 2 ;; esac
  keys=${QODA_SSH_KEY_DIR:-/run/qoda-ssh}
  mkdir -p /root/.ssh && chmod 700 /root/.ssh
  if [ -d "$keys" ]; then
    for f in "$keys"/*; do
      [ -f "$f" ] || continue
      cp "$f" /root/.ssh/ && chmod 600 "/root/.ssh/$(basename "$f")"
    done
  fi
  [ -s /root/.ssh/authorized_keys ] || {
    echo "QODA_SSHD=1 needs /root/.ssh/authorized_keys (mount a folder with it at $keys)" >&2; exit 2; }
  ssh-keygen -A >/dev/null
  # ssh sessions (mpirun's orted, horovodrun's remote commands) do not see the container's
  # environment; sshd's PAM session reads /etc/environment, so put the image's settings there.
  env | grep -E '^(PATH|LD_LIBRARY_PATH|VIRTUAL_ENV|LANG|OMPI_[A-Za-z_]*|NCCL_[A-Z_]*|UCX_[A-Z_]*|CUDA_[A-Z_]*|NVIDIA_[A-Z_]*|HOROVOD_[A-Z_]*|QODA_[A-Z_]*|PIP_CERT|SSL_CERT_FILE|REQUESTS_CA_BUNDLE)=' \
    | grep -v -E '^(QODA_SSHD|QODA_SSH_KEY_DIR)=' >/etc/environment || true
  mkdir -p /etc/ssh/ssh_config.d /run/sshd
  printf 'Host *\n  Port %s\n  StrictHostKeyChecking accept-new\n  SendEnv OMPI_* NCCL_* GLOO_* HOROVOD_* QODA_* UCX_*\n' \
    "$port" >/etc/ssh/ssh_config.d/qoda.conf
  /usr/sbin/sshd -p "$port"
  echo "sshd listening on port $port" >&2
fi
exec "$@"

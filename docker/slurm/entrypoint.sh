#!/usr/bin/env bash
# Start one role of the compose cluster in the foreground: munge-key | slurmctld | slurmd | login.
set -euo pipefail
role=${1:?usage: slurm-entrypoint munge-key|slurmctld|slurmd|login}

start_munge() {
  # the key comes from the shared munge-key volume, made once by the munge-key service
  for _ in $(seq 1 60); do [ -s /etc/munge/munge.key ] && break; sleep 1; done
  [ -s /etc/munge/munge.key ] || { echo "no /etc/munge/munge.key: is the munge-key service done?" >&2; exit 2; }
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
}

case "$role" in
  munge-key)
    if [ ! -s /etc/munge/munge.key ]; then
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    echo "munge key ready" ;;
  slurmctld)
    start_munge
    mkdir -p /var/spool/slurmctld /var/log/slurm
    exec /usr/sbin/slurmctld -D ;;
  slurmd)
    start_munge
    mkdir -p /var/spool/slurmd /var/log/slurm
    exec /usr/sbin/slurmd -D ;;
  login)
    start_munge
    mkdir -p /run/sshd /home/atlas/.ssh
    # the host key persists in the ssh-host-keys volume, so known_hosts stays valid across restarts
    mkdir -p /etc/ssh/host-keys
    [ -s /etc/ssh/host-keys/ssh_host_ed25519_key ] \
      || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/host-keys/ssh_host_ed25519_key
    # authorized_keys is mounted read-only from docker/slurm/authorized_keys (your public key)
    install -o atlas -g root -m 0600 /run/atlasflow/authorized_keys /home/atlas/.ssh/authorized_keys
    chown atlas:root /home/atlas/.ssh && chmod 0700 /home/atlas/.ssh
    exec /usr/sbin/sshd -D -e ;;
  *) echo "unknown role $role" >&2; exit 2 ;;
esac

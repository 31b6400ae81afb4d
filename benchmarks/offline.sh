#!/usr/bin/env bash
# Runs a command with no network but loopback (a new network namespace), as on the GPU machine, where this
# machine allows it (root, unshare, ip); elsewhere it runs the command as it is and says so on stderr.
#   bash benchmarks/offline.sh COMMAND [ARGS...]
if unshare -n true 2>/dev/null && command -v ip >/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' offline "$@"
fi
echo "offline.sh: cannot make a network namespace here; running with the network" >&2
exec "$@"

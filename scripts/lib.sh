# Helpers the bench scripts share; `source scripts/lib.sh` from the repository root.

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 30 s for a listener on loopback port $1.
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

# `weed mini` flags giving each of SeaweedFS's ports besides S3 a free one (its
# defaults, 8080 and 9333 among them, may be taken), one per line.
weed_port_flags() {
  for flag in master.port master.port.grpc volume.port volume.port.grpc filer.port \
    filer.port.grpc admin.port admin.port.grpc webdav.port s3.port.grpc s3.port.iceberg; do
    printf -- '-%s=%s\n' "$flag" "$(free_port)"
  done
}

# CPU seconds (user + system) process $1 has used.
cpu_s() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }

# A scratch directory in $WORK, and the processes in $PIDS, both gone when the script
# exits.
with_scratch() {
  WORK=$(mktemp -d)
  PIDS=()
  # KEEP_WORK=1 (set by the caller, or by a script that found something wrong) keeps it.
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
        if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi' EXIT
}

# $BIN: the directory of the release binaries, `sluice` and `sluice-loadtest`.
# BENCH_BIN=<dir> names a build to use; without it they are built here.
release_bins() {
  BIN="${BENCH_BIN:-}"
  if [ -z "$BIN" ]; then
    cargo build --release -q -p sluice -p sluice-loadtest --bin sluice --bin sluice-loadtest
    BIN=target/release
  fi
}

#!/usr/bin/env bash
# The cost of TLS and device security on the embedded broker (issue 22's benchmark),
# both sides in the same run, each on a fresh lake:
#   plain    mqtt:// to the door, no authentication, no ACL
#   secure   mqtts:// with a client certificate per connection (mTLS, identity = its
#            common name) and [broker.acl] checked on every publish, plus the
#            identity_mismatch check in the decoder
# 1. Throughput: QoS 1 telemetry from DEVICES devices over CONNECTIONS connections at
#    RATE events/s (default 200,000: above what this machine sustains, so the achieved
#    rate is the capacity) for DURATION. Reports events/s achieved, ack p50/p99, sluice
#    CPU-seconds and events per CPU-second, and secure/plain for each.
# 2. Handshakes: STORM clients (default 10,000) connect at once (each its own
#    certificate in the secure run); reports the time until the last CONNACK.
#
#   scripts/bench-security.sh          # BENCH_BIN=<dir> skips the release build
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-200000}
DEVICES=${DEVICES:-1000}
CONNECTIONS=${CONNECTIONS:-4}
DURATION=${DURATION:-20s}
STORM=${STORM:-10000}
CERTS=${CERTS:-/tmp/sluice-bench-certs}   # kept between runs: 10,000 certificates take a while
source scripts/lib.sh
with_scratch
ulimit -n "$(ulimit -Hn)"

release_bins

# A CA, the server's certificate, and one client certificate per client id (lt-<i>
# for the throughput run, storm-<i> for the handshake run).
python3 -c 'import cryptography' 2>/dev/null || pip install -q cryptography
mkdir -p "$CERTS"
python3 - "$CERTS" "$CONNECTIONS" "$STORM" <<'PY'
import datetime, ipaddress, os, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
d, conns, storm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
now = datetime.datetime.now(datetime.timezone.utc)
def pem(key): return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
def save(name, cert, key):
    open(f"{d}/{name}.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
    open(f"{d}/{name}.key", "wb").write(pem(key))
if os.path.exists(f"{d}/ca.key"):
    ca_key = serialization.load_pem_private_key(open(f"{d}/ca.key", "rb").read(), None)
    ca = x509.load_pem_x509_certificate(open(f"{d}/ca.pem", "rb").read())
else:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    save("ca", ca, ca_key)
def issue(cn, server=False):
    if os.path.exists(f"{d}/{cn}.pem"): return
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365)))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    save(cn, b.sign(ca_key, hashes.SHA256()), key)
issue("server", server=True)
for i in range(conns): issue(f"lt-{i}")
for i in range(storm): issue(f"storm-{i}")
PY

# start MODE: a sluice run with a plain listener, and for MODE=secure a TLS listener
# with client certificates and the ACL. Sets PID, HTTP, URL.
start() {
  local mode=$1 mqtt tls config
  mqtt=$(free_port)
  tls=$(free_port)
  HTTP=$(free_port)
  config="$WORK/$mode.toml"
  sed -e 's/^max_connections = 10000/max_connections = 30000/' \
    -e 's/^max_connections_per_address = 100/max_connections_per_address = 0/' \
    -e 's/^connect_timeout = "10s"/connect_timeout = "120s"/' \
    config/examples/default.toml >"$config"
  if [ "$mode" = secure ]; then
    cat >>"$config" <<TOML
[broker.tls]
listen = "127.0.0.1:$tls"
cert_file = "$CERTS/server.pem"
key_file = "$CERTS/server.key"
client_ca_file = "$CERTS/ca.pem"
[broker.acl]
publish = ["devices/{client_id}/#", "devices/+/telemetry"]
TOML
    URL="mqtts://127.0.0.1:$tls"
  else
    URL="mqtt://127.0.0.1:$mqtt"
  fi
  SLUICE_LOG=warn "$BIN/sluice" run --config "$config" --data-dir "$WORK/lake-$mode-$RANDOM" \
    --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$HTTP" 2>>"$WORK/sluice-$mode.log" &
  PID=$!
  PIDS+=("$PID")
  wait_port "$HTTP"
  wait_port "$mqtt"
  [ "$mode" = plain ] || wait_port "$tls"
}

stop() { kill -TERM "$PID"; wait "$PID" || true; }

throughput() {
  local mode=$1 cpu0 cpu1 certs=()
  [ "$mode" = secure ] && certs=(--cert-dir "$CERTS")
  start "$mode"
  cpu0=$(cpu_s "$PID")
  "$BIN/sluice-loadtest" telemetry --target "$URL" --qos 1 --connections "$CONNECTIONS" \
    --client-id lt --ca-file "$CERTS/ca.pem" "${certs[@]}" \
    --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --no-progress \
    --report "$WORK/report-$mode.json" >"$WORK/loadtest-$mode.txt" 2>&1
  cpu1=$(cpu_s "$PID")
  local denied
  denied=$(curl -s "http://127.0.0.1:$HTTP/metrics" | awk '/^sluice_broker_denied_total/ { n += $2 } END { print n + 0 }')
  stop
  python3 - "$WORK/report-$mode.json" "$mode" "$(python3 -c "print($cpu1 - $cpu0)")" "$denied" >>"$WORK/throughput.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); mode, cpu, denied = sys.argv[2], float(sys.argv[3]), sys.argv[4]
a = r["ack_latency"] or {}
rate = r["acked"] / max(r["send_s"], 1e-9)
print(f"{mode} {rate:.0f} {r['acked'] / max(cpu, 1e-9):.0f} {a.get('p50_us', 0)/1000:.1f} {a.get('p99_us', 0)/1000:.1f} {cpu:.1f} {r['acked']} {denied}")
PY
}

storm() {
  local mode=$1 line certs=()
  [ "$mode" = secure ] && certs=(--cert-dir "$CERTS")
  start "$mode"
  line=$("$BIN/sluice-loadtest" telemetry --target "$URL" --qos 1 --connections "$STORM" \
    --client-id storm --ca-file "$CERTS/ca.pem" "${certs[@]}" \
    --devices "$STORM" --rate 1000 --duration 2s --no-progress 2>&1 | grep -m1 '^connected' || true)
  stop
  echo "$mode ${line:-failed: see $WORK/sluice-$mode.log}" >>"$WORK/storm.txt"
}

throughput plain
throughput secure
storm plain
storm secure

echo "== QoS 1 ingest at $RATE events/s offered, $DEVICES devices over $CONNECTIONS connections, $DURATION"
python3 - "$WORK/throughput.txt" <<'PY'
import sys
rows = {l.split()[0]: l.split()[1:] for l in open(sys.argv[1])}
for mode, (rate, per_cpu, p50, p99, cpu, acked, denied) in rows.items():
    print(f"  {mode:6}  {float(rate):>9,.0f} events/s  {float(per_cpu):>9,.0f} events per sluice CPU-s  "
          f"ack p50 {p50} ms  p99 {p99} ms  sluice CPU {cpu} s  acked {acked}  denied {denied}")
p, s = rows["plain"], rows["secure"]
print(f"  secure/plain: events/s {float(s[0]) / float(p[0]):.2f}x, events per CPU-s {float(s[1]) / float(p[1]):.2f}x (target >= 0.80)")
PY
echo "== $STORM clients connecting at once"
cat "$WORK/storm.txt"

#!/bin/sh
# Smoke test of the VM test tier; run it through the runner:
#     tests/vm/vmrun -- sh tests/vm/smoke.sh
# Checks, inside the guest: a stock Debian kernel; nft loads a native
# `queue num 0 bypass` rule (inet table, output hook, priority raw); network
# namespaces + a veth pair carry traffic; the venv's python imports nftables
# and netfilterqueue; and a packet really goes through NFQUEUE to a
# netfilterqueue listener and is accepted.  Exits non-zero on the first failure.
set -eu

NS_A=ndvm-smoke-a
NS_B=ndvm-smoke-b
TABLE=ndvm_smoke

rx_pid=
cleanup() {
    [ -z "$rx_pid" ] || kill "$rx_pid" 2>/dev/null || true
    nft delete table inet "$TABLE" 2>/dev/null || true
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
}
trap cleanup EXIT

ok() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; exit 1; }

# 1. kernel ------------------------------------------------------------------
kver=$(uname -r)
[ "$(id -u)" = 0 ] || fail "not root in the guest"
case "$kver" in
    *-amd64) ;;
    *) fail "uname -r is $kver, not a Debian -amd64 kernel" ;;
esac
if [ -n "${NFTDIVERT_VM_KERNEL:-}" ] && [ "$kver" != "$NFTDIVERT_VM_KERNEL" ]; then
    fail "uname -r is $kver, expected $NFTDIVERT_VM_KERNEL"
fi
uname -v | grep -q 'Debian' || fail "uname -v does not name Debian: $(uname -v)"
ok "kernel $kver ($(uname -v))"

# 2. nft native queue --------------------------------------------------------
nft -f - <<EOF || fail "nft could not load a queue rule"
table inet $TABLE {
    chain out {
        type filter hook output priority raw; policy accept;
        meta l4proto udp udp dport 9 queue num 0 bypass
    }
}
EOF
# nft 1.0.6 prints it back as "queue flags bypass to 0"
nft list table inet "$TABLE" | grep -Eq 'queue .*(num 0|to 0)' \
    && nft list table inet "$TABLE" | grep -q 'queue .*bypass' \
    || fail "queue rule not listed back: $(nft list table inet $TABLE)"
nft delete table inet "$TABLE" || fail "nft delete table"
ok "nft inet table, output hook priority raw, 'queue num 0 bypass' loaded and deleted"

# 3. netns + veth ------------------------------------------------------------
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add ndvm-va type veth peer name ndvm-vb
ip link set ndvm-va netns "$NS_A"
ip link set ndvm-vb netns "$NS_B"
ip -n "$NS_A" addr add 192.0.2.1/24 dev ndvm-va
ip -n "$NS_B" addr add 192.0.2.2/24 dev ndvm-vb
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set ndvm-va up
ip -n "$NS_B" link set ndvm-vb up
ip netns exec "$NS_A" ping -c 1 -W 5 192.0.2.2 >/dev/null || fail "ping over veth between netns"
ok "netns $NS_A <-> $NS_B over a veth pair (ping 192.0.2.2)"

# 4. python bindings ---------------------------------------------------------
py=$(command -v python3)
"$py" -c 'import nftables, netfilterqueue' || fail "$py cannot import nftables, netfilterqueue"
ok "$py imports nftables, netfilterqueue"

# 5. a packet through NFQUEUE (netns A -> B, UDP) ----------------------------
ip netns exec "$NS_A" nft -f - <<EOF
table inet $TABLE {
    chain out {
        type filter hook output priority raw; policy accept;
        ip daddr 192.0.2.2 udp dport 9999 queue num 0
    }
}
EOF
rm -f /tmp/ndvm-smoke-ready /tmp/ndvm-smoke-rx
ip netns exec "$NS_B" "$py" - <<'EOF' &
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.2", 9999))
open("/tmp/ndvm-smoke-ready", "w").close()
s.settimeout(60)
data, peer = s.recvfrom(100)
open("/tmp/ndvm-smoke-rx", "wb").write(data)
EOF
rx_pid=$!
i=0
while [ ! -e /tmp/ndvm-smoke-ready ]; do  # python is slow to start under TCG
    i=$((i + 1)); [ "$i" -le 600 ] || fail "receiver in $NS_B did not start"
    sleep 0.1
done
ip netns exec "$NS_A" "$py" - <<'EOF' || fail "packet did not go through the queue"
import select, socket, sys, time
from netfilterqueue import NetfilterQueue
seen = []
def cb(pkt):
    seen.append(pkt.get_payload_len())
    pkt.accept()
q = NetfilterQueue()
q.bind(0, cb)
fd = q.get_fd()
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.sendto(b"ndvm-hello", ("192.0.2.2", 9999))
deadline = time.monotonic() + 10
while not seen and time.monotonic() < deadline:
    if select.select([fd], [], [], 0.5)[0]:
        q.run(block=False)
q.unbind()
print("queued packets:", seen)
sys.exit(0 if seen else 1)
EOF
wait "$rx_pid" || fail "receiver in $NS_B got nothing after the verdict"
[ "$(cat /tmp/ndvm-smoke-rx)" = ndvm-hello ] || fail "wrong payload received"
ok "UDP packet queued to NFQUEUE 0, accepted by netfilterqueue, received in $NS_B"

echo "smoke: all checks passed"

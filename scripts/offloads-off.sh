#!/usr/bin/env bash
# Turns off GRO and LRO on IFACE: coalesced super-packets would reach the kernel UDP path (and
# skb-mode XDP) as one large buffer instead of the datagrams the protocol counts, and native XDP
# cannot attach to a device with LRO on.
#
#   scripts/offloads-off.sh IFACE [--dry-run]
#
# Idempotent; features the driver fixes (shown as [fixed] by ethtool -k) are reported, not forced.
source "$(dirname "$0")/common.sh"

parse_args "$(basename "$0") IFACE [--dry-run]" 1 "$@"
iface=${ARGS[0]}
need_cmd ethtool ethtool
need_iface "$iface"
need_root

features=$(ethtool -k "$iface") || die "ethtool -k $iface failed"
for f in generic-receive-offload:gro large-receive-offload:lro; do
    long=${f%%:*} short=${f#*:}
    line=$(grep "^$long:" <<<"$features" || true)
    if [[ -z $line ]]; then
        echo "unchanged     $iface $short = not offered by the driver"
        continue
    fi
    state=$(awk '{print $2}' <<<"$line")
    if [[ $line == *"[fixed]"* ]]; then
        echo "unchanged     $iface $short = $state (fixed by the driver)"
        continue
    fi
    report "$iface $short" "$state" off
    if [[ $state != off ]]; then
        apply ethtool -K "$iface" "$short" off
    fi
done

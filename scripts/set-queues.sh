#!/usr/bin/env bash
# Sets IFACE's combined RX/TX channel count (ethtool -L): one AF_XDP socket and one ingest thread
# run per RX queue, so this is the appliance's parallelism on that NIC.
#
#   scripts/set-queues.sh IFACE COUNT [--dry-run]
#
# Idempotent: prints "unchanged" when the count is already COUNT.
source "$(dirname "$0")/common.sh"

parse_args "$(basename "$0") IFACE COUNT [--dry-run]" 2 "$@"
iface=${ARGS[0]} count=${ARGS[1]}
[[ $count =~ ^[1-9][0-9]*$ ]] || die "COUNT must be a positive integer, not '$count'"
need_cmd ethtool ethtool
need_iface "$iface"
need_root

info=$(ethtool -l "$iface" 2>/dev/null) || die "$iface does not report channels (ethtool -l): its driver has a fixed queue count"
# The "Pre-set maximums" block comes first, then "Current hardware settings".
max=$(awk '/maximums/{m=1} /Current/{m=0} m && /^Combined:/{print $2}' <<<"$info")
cur=$(awk '/Current/{c=1} c && /^Combined:/{print $2}' <<<"$info")
if [[ -z $cur || $cur == n/a || $max == 0 ]]; then
    # Drivers with separate RX/TX channels (veth among them).
    max=$(awk '/maximums/{m=1} /Current/{m=0} m && /^RX:/{print $2}' <<<"$info")
    cur=$(awk '/Current/{c=1} c && /^RX:/{print $2}' <<<"$info")
    kind=rx
else
    kind=combined
fi
[[ -n $cur && $cur != n/a ]] || die "$iface reports no settable channel count"
if [[ $max =~ ^[0-9]+$ ]] && ((count > max)); then
    die "$iface supports at most $max $kind channels, not $count"
fi
report "$iface $kind channels" "$cur" "$count"
if [[ $cur != "$count" ]]; then
    apply ethtool -L "$iface" "$kind" "$count"
fi

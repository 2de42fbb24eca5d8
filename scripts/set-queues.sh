#!/usr/bin/env bash
# Sets IFACE's combined RX/TX channel count (ethtool -L): one AF_XDP socket and one ingest thread
# run per RX queue, so this is the appliance's parallelism on that NIC.
#
#   scripts/set-queues.sh IFACE COUNT [--dry-run]
#
# Idempotent: prints "unchanged" when the count is already COUNT.
source "$(dirname "$0")/common.sh"

usage() { die "usage: $(basename "$0") IFACE COUNT [--dry-run]"; }
args=()
for a in "$@"; do
    case $a in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage ;;
    *) args+=("$a") ;;
    esac
done
[[ ${#args[@]} == 2 ]] || usage
iface=${args[0]} count=${args[1]}
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

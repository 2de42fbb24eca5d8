#!/usr/bin/env bash
# Reserves COUNT 2 MiB hugepages, on NUMA node NODE when given (the NIC's node: see
# /sys/class/net/IF/device/numa_node), else system-wide. The appliance backs UMEM with them when
# they are there, and falls back to locked 4 KiB pages when they are not.
#
#   scripts/hugepages.sh COUNT [--node NODE] [--dry-run]
#
# Idempotent: only raises or lowers the reservation to COUNT; says how many the kernel actually
# reserved (fragmented memory can give fewer).
source "$(dirname "$0")/common.sh"

usage() { die "usage: $(basename "$0") COUNT [--node NODE] [--dry-run]"; }
args=() node=
while [[ $# -gt 0 ]]; do
    case $1 in
    --dry-run) DRY_RUN=1 ;;
    --node)
        [[ $# -ge 2 ]] || usage
        node=$2
        shift
        ;;
    -h | --help) usage ;;
    *) args+=("$1") ;;
    esac
    shift
done
[[ ${#args[@]} == 1 ]] || usage
count=${args[0]}
[[ $count =~ ^[0-9]+$ ]] || die "COUNT must be a non-negative integer, not '$count'"
need_root

if [[ -n $node ]]; then
    [[ $node =~ ^[0-9]+$ ]] || die "--node must be a node number, not '$node'"
    file=/sys/devices/system/node/node$node/hugepages/hugepages-2048kB/nr_hugepages
    [[ -e $file ]] || die "no NUMA node $node with 2 MiB hugepages ($file missing)"
    what="node $node 2MiB hugepages"
else
    file=/proc/sys/vm/nr_hugepages
    what="vm.nr_hugepages (2MiB)"
fi
cur=$(cat "$file")
report "$what" "$cur" "$count"
if [[ $cur != "$count" && $DRY_RUN == 0 ]]; then
    echo "$count" >"$file"
    got=$(cat "$file")
    if [[ $got != "$count" ]]; then
        echo "warning: the kernel reserved $got of $count (memory too fragmented; try at boot: hugepages=$count)" >&2
    fi
fi

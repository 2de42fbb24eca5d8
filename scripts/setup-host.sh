#!/usr/bin/env bash
# Prepares a host NIC for the appliance, in order: queue count, GRO/LRO off, IRQs pinned to the
# NIC's NUMA node, hugepages reserved on that node. Each step prints what it changed.
#
#   scripts/setup-host.sh IFACE [--queues N] [--hugepages N] [--dry-run]
#
# Idempotent: a second run reports everything unchanged.
source "$(dirname "$0")/common.sh"
here=$(dirname "$0")

usage() { die "usage: $(basename "$0") IFACE [--queues N] [--hugepages N] [--dry-run]"; }
iface= queues= pages= pass=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --dry-run) DRY_RUN=1 pass+=(--dry-run) ;;
    --queues)
        [[ $# -ge 2 ]] || usage
        queues=$2
        shift
        ;;
    --hugepages)
        [[ $# -ge 2 ]] || usage
        pages=$2
        shift
        ;;
    -h | --help) usage ;;
    -*) usage ;;
    *)
        [[ -z $iface ]] || usage
        iface=$1
        ;;
    esac
    shift
done
[[ -n $iface ]] || usage
need_iface "$iface"
node=$(iface_node "$iface")
echo "# $iface: NUMA node $node (-1: none reported)"
if [[ -n $queues ]]; then
    bash "$here/set-queues.sh" "$iface" "$queues" "${pass[@]}"
fi
bash "$here/offloads-off.sh" "$iface" "${pass[@]}"
bash "$here/pin-irqs.sh" "$iface" "${pass[@]}"
if [[ -n $pages ]]; then
    if [[ $node -ge 0 ]]; then
        bash "$here/hugepages.sh" "$pages" --node "$node" "${pass[@]}"
    else
        bash "$here/hugepages.sh" "$pages" "${pass[@]}"
    fi
fi

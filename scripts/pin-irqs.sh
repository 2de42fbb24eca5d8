#!/usr/bin/env bash
# Pins each of IFACE's queue IRQs to one core of the NIC's NUMA node, queue i to the i-th core
# (round-robin), so the softirq work of queue i runs beside the ingest thread and UMEM of
# socket i. Stop irqbalance first, or it moves them back (the script says so when it runs).
#
#   scripts/pin-irqs.sh IFACE [--dry-run]
#
# Idempotent: an IRQ already on its core is reported unchanged.
source "$(dirname "$0")/common.sh"

parse_args "$(basename "$0") IFACE [--dry-run]" 1 "$@"
iface=${ARGS[0]}
need_iface "$iface"
need_root

node=$(iface_node "$iface")
read -ra cpus <<<"$(node_cpus "$node")"
if [[ $node -lt 0 ]]; then
    echo "note: $iface reports no NUMA node (virtual device or one-node machine); using all online CPUs"
fi
# MSI-X vectors of the device, in the order the driver registered them (queue order).
irqs=()
if [[ -d /sys/class/net/$iface/device/msi_irqs ]]; then
    mapfile -t irqs < <(ls /sys/class/net/"$iface"/device/msi_irqs | sort -n)
    # Keep the vectors /proc/interrupts names after the interface's queues, when it names them.
    named=()
    for irq in "${irqs[@]}"; do
        if grep -qE "^ *$irq:.*$iface[-_]" /proc/interrupts; then named+=("$irq"); fi
    done
    if [[ ${#named[@]} -gt 0 ]]; then irqs=("${named[@]}"); fi
fi
if [[ ${#irqs[@]} == 0 ]]; then
    echo "unchanged     $iface has no IRQs of its own (virtual device?): nothing to pin"
    exit 0
fi
if pgrep -x irqbalance >/dev/null 2>&1; then
    echo "warning: irqbalance is running and will move these IRQs; stop it (systemctl stop irqbalance)" >&2
fi
i=0
for irq in "${irqs[@]}"; do
    cpu=${cpus[i % ${#cpus[@]}]}
    file=/proc/irq/$irq/smp_affinity_list
    cur=$(cat "$file" 2>/dev/null || echo "?")
    report "$iface irq $irq (queue $i) cpus" "$cur" "$cpu"
    if [[ $cur != "$cpu" ]]; then
        apply sh -c "echo $cpu > $file"
    fi
    i=$((i + 1))
done

# Shared by the host scripts: argument helpers, dry-run, and the change log.
# Each script prints one line per setting: "changed", "unchanged" or "would change" (--dry-run).

set -euo pipefail

DRY_RUN=0

die() {
    echo "error: $*" >&2
    exit 1
}

# report WHAT FROM TO: one line saying what happened to a setting.
report() {
    local what=$1 from=$2 to=$3
    if [[ "$from" == "$to" ]]; then
        echo "unchanged     $what = $to"
    elif [[ $DRY_RUN == 1 ]]; then
        echo "would change  $what: $from -> $to"
    else
        echo "changed       $what: $from -> $to"
    fi
}

# apply CMD...: runs the command unless --dry-run.
apply() {
    if [[ $DRY_RUN == 0 ]]; then
        "$@"
    fi
}

# parse_args USAGE COUNT ARGS...: sets DRY_RUN for --dry-run, leaves the positional arguments
# in ARGS, and stops with USAGE for -h, an unknown option, or other than COUNT positionals.
parse_args() {
    local usage=$1 count=$2 a
    shift 2
    ARGS=()
    for a in "$@"; do
        case $a in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) die "usage: $usage" ;;
        -*) die "unknown option $a; usage: $usage" ;;
        *) ARGS+=("$a") ;;
        esac
    done
    [[ ${#ARGS[@]} == "$count" ]] || die "usage: $usage"
}

need_root() {
    if [[ $DRY_RUN == 0 && $(id -u) != 0 ]]; then
        die "$(basename "$0") changes kernel settings: run it as root (or with --dry-run)"
    fi
}

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found (Debian: apt-get install $2)"
}

need_iface() {
    [[ -e /sys/class/net/$1 ]] || die "no interface $1 (see: ip -br link)"
}

# The NUMA node of IFACE's device, or -1 when it has none (virtual device, one-node machine).
iface_node() {
    local n
    n=$(cat "/sys/class/net/$1/device/numa_node" 2>/dev/null || echo -1)
    echo "${n:--1}"
}

# The CPUs of node N as a space-separated list (all online CPUs for node -1).
node_cpus() {
    local list
    if [[ $1 -ge 0 && -r /sys/devices/system/node/node$1/cpulist ]]; then
        list=$(cat "/sys/devices/system/node/node$1/cpulist")
    else
        list=$(cat /sys/devices/system/cpu/online)
    fi
    local out=() part a b
    IFS=, read -ra parts <<<"$list"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then
            a=${part%-*} b=${part#*-}
            for ((c = a; c <= b; c++)); do out+=("$c"); done
        else
            out+=("$part")
        fi
    done
    echo "${out[@]}"
}

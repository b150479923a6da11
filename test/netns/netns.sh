#!/bin/sh
# Test hosts on this machine: network namespaces joined by veth pairs to a bridge, so each
# "host" has its own address, loopback and EPMD port, and traffic stays between them (the
# bridge lives in a namespace of its own: nothing is connected to the machine's network).
# Used by test/erpy_netns.erl (the partition suite); usable by hand as root:
#
#   netns.sh probe PREFIX            exit 0 when namespaces can be made here (root, ip netns)
#   netns.sh up PREFIX N             hosts PREFIX-h0 .. PREFIX-h(N-1), 10.77.0.1 .. 10.77.0.N/24
#   netns.sh cut PREFIX I            unplug host I's cable (its port on the bridge goes down)
#   netns.sh heal PREFIX I           plug it back
#   netns.sh down PREFIX             kill every process in PREFIX's namespaces, delete them
#   netns.sh clean                   `down` every erpyt<PID> prefix whose PID is gone
#
# Run a command on a host with `ip netns exec PREFIX-h1 CMD`. Deleting a namespace deletes
# the links in it, and killing what runs in it first makes sure none holds it on.
set -u
IP=${IP:-ip}
cmd=${1:-}
prefix=${2:-}

down() {
    for ns in $($IP netns list 2>/dev/null | awk '{print $1}' | grep "^$1-"); do
        # Twice: a process may fork while the first round kills.
        for round in 1 2; do
            pids=$($IP netns pids "$ns" 2>/dev/null)
            [ -n "$pids" ] && kill -9 $pids 2>/dev/null
            [ -n "$pids" ] && sleep 0.1
        done
        $IP netns del "$ns" 2>/dev/null
    done
    return 0
}

case "$cmd" in
probe)
    [ "$(id -u)" = 0 ] || { echo "not root"; exit 1; }
    command -v "$IP" >/dev/null 2>&1 || { echo "no ip command (iproute2)"; exit 1; }
    if ! out=$($IP netns add "$prefix-probe" 2>&1); then
        echo "ip netns add is not permitted here: $out"; exit 1
    fi
    if ! out=$($IP -n "$prefix-probe" link add br0 type bridge 2>&1); then
        $IP netns del "$prefix-probe"
        echo "cannot make a bridge in a namespace: $out"; exit 1
    fi
    $IP netns del "$prefix-probe"
    ;;
up)
    n=${3:?count}
    set -e
    sw="$prefix-sw"
    $IP netns add "$sw"
    $IP -n "$sw" link add br0 type bridge
    $IP -n "$sw" link set br0 up
    i=0
    while [ "$i" -lt "$n" ]; do
        h="$prefix-h$i"
        $IP netns add "$h"
        $IP -n "$h" link set lo up
        # Made inside the switch's namespace, the host end moved at once: no name is ever
        # taken in the machine's own namespace.
        $IP -n "$sw" link add "p$i" type veth peer name eth0 netns "$h"
        $IP -n "$sw" link set "p$i" master br0
        $IP -n "$sw" link set "p$i" up
        $IP -n "$h" addr add "10.77.0.$((i + 1))/24" dev eth0
        $IP -n "$h" link set eth0 up
        i=$((i + 1))
    done
    ;;
cut)
    $IP -n "$prefix-sw" link set "p${3:?host}" down
    ;;
heal)
    $IP -n "$prefix-sw" link set "p${3:?host}" up
    ;;
down)
    down "$prefix"
    ;;
clean)
    for p in $($IP netns list 2>/dev/null | awk '{print $1}' | grep '^erpyt[0-9]*-' | sed 's/-.*//' | sort -u); do
        pid=${p#erpyt}
        kill -0 "$pid" 2>/dev/null || down "$p"
    done
    ;;
*)
    echo "usage: $0 probe|up|cut|heal|down|clean PREFIX [N|I]" >&2
    exit 2
    ;;
esac

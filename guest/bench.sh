# lguest-jit default guest: the `bench` workload (lguest_jit.workload=bench),
# sourced by /init, which defines step(), SCRATCH, GUEST_IP and PEER_IP.
# `lguest-jit bench guest` (benchmarks/bench_guest.py) reads its lines.
#
# Every timed step is one line
#     LGJ-STEP bench-<name> OK|FAIL|SKIP <uptime> start=<uptime> end=<uptime> key=value...
# timed by the guest's own clock (/proc/uptime, 10 ms steps, read with a
# shell builtin: no process of its own).  A step that failed says FAIL and
# why; the host never turns it into a number.  Before each group of steps
# the guest prints LGJ-BENCH-BEGIN <group> and after it LGJ-BENCH-END
# <group>: the host snapshots the launcher's counters and profile there.
#
# Sizes come from the command line (lguest_jit.bench_*=, defaults below:
# the full workload); bench_guest.py passes smaller ones for --quick.
B_MIB=64          # sequential direct read and write, 1 MiB requests
B_BUF_MIB=16      # buffered read (page cache, readahead)
B_RAND=2000       # 4 KiB random direct reads
B_NET_KIB=16384   # TCP each way
B_PINGS=10
B_RNG_KIB=64
B_PROCS=20        # fork+exec pipelines
B_FLUSH_KIB=1024  # written buffered (4 KiB writes), then fsync
B_GROUPS="blk net rng proc"
for arg in $CMDLINE; do
    case $arg in
        lguest_jit.bench_mib=*) B_MIB=${arg#*=} ;;
        lguest_jit.bench_buf_mib=*) B_BUF_MIB=${arg#*=} ;;
        lguest_jit.bench_rand=*) B_RAND=${arg#*=} ;;
        lguest_jit.bench_net_kib=*) B_NET_KIB=${arg#*=} ;;
        lguest_jit.bench_pings=*) B_PINGS=${arg#*=} ;;
        lguest_jit.bench_rng_kib=*) B_RNG_KIB=${arg#*=} ;;
        lguest_jit.bench_procs=*) B_PROCS=${arg#*=} ;;
        lguest_jit.bench_flush_kib=*) B_FLUSH_KIB=${arg#*=} ;;
        lguest_jit.bench_groups=*)
            # a,b,c -> "a b c" with the shell alone (no process)
            _rest=${arg#*=}
            B_GROUPS=
            while [ -n "$_rest" ]; do
                B_GROUPS="$B_GROUPS ${_rest%%,*}"
                case $_rest in *,*) _rest=${_rest#*,} ;; *) _rest= ;; esac
            done
            ;;
    esac
done
# Ports the host's peer (bench_guest.py) listens on, on PEER_IP.
NET_RX_PORT=5001   # sends B_NET_KIB KiB and closes
NET_TX_PORT=5002   # reads to EOF, then closes

# timed NAME DETAIL -- COMMAND...: run COMMAND with stderr to a file; one
# LGJ-STEP line with its start and end uptime, or FAIL with its first
# error line.
timed() {
    _tname=$1
    _tdetail=$2
    shift 3
    uptime_now
    _t0=$UPTIME
    if "$@" 2>/tmp/lgj-bench.err; then
        uptime_now
        step "bench-$_tname" OK "start=$_t0 end=$UPTIME $_tdetail"
    else
        _rc=$?
        _err=
        read -r _err < /tmp/lgj-bench.err
        step "bench-$_tname" FAIL "rc=$_rc $_err"
    fi
}

bench_blk() {
    if [ -z "$SCRATCH" ] || [ ! -b "/dev/$SCRATCH" ]; then
        step bench-blk SKIP "no scratch disk"
        return
    fi
    dev=/dev/$SCRATCH
    read -r sectors < "/sys/block/$SCRATCH/size"
    need=$(((B_MIB + B_BUF_MIB + 1) * 2048))
    if [ "$sectors" -lt "$need" ]; then
        step bench-blk FAIL "dev=$SCRATCH sectors=$sectors need=$need"
        return
    fi
    b=$((B_MIB << 20))
    timed blk-write-direct "bytes=$b bs=1048576" -- \
        dd if=/dev/zero of="$dev" bs=1M count="$B_MIB" oflag=direct
    timed blk-read-direct "bytes=$b bs=1048576" -- \
        dd if="$dev" of=/dev/null bs=1M count="$B_MIB" iflag=direct
    # Buffered: past the region read above, the block device's page cache
    # dropped first, so the bytes come from the device through readahead.
    blockdev --flushbufs "$dev"
    timed blk-read-buffered "bytes=$((B_BUF_MIB << 20)) bs=1048576" -- \
        dd if="$dev" of=/dev/null bs=1M count="$B_BUF_MIB" skip="$B_MIB"
    timed blk-read-random "reads=$B_RAND bytes=$((B_RAND * 4096)) bs=4096" -- \
        lgj-randread "$dev" "$B_RAND" "$B_MIB"
    # B_FLUSH_KIB buffered then fsync: the write-back and a FLUSH request.
    timed blk-flush "bytes=$((B_FLUSH_KIB << 10))" -- \
        dd if=/dev/zero of="$dev" bs=4K count="$((B_FLUSH_KIB / 4))" seek="$((B_MIB << 8))" conv=fsync
}

bench_net() {
    if [ ! -e /sys/class/net/eth0 ]; then
        step bench-net SKIP "no eth0"
        return
    fi
    ip link set lo up
    if ! ip addr add "$GUEST_IP" dev eth0 || ! ip link set eth0 up; then
        step bench-net FAIL "cannot configure $GUEST_IP"
        return
    fi
    # The first ping also waits for the link and ARP: not timed.
    ping -c 1 -W 10 "$PEER_IP" > /dev/null 2>&1
    out=$(ping -c "$B_PINGS" -i 0.2 -W 2 "$PEER_IP" 2>&1)
    case $out in
        *round-trip*=*)
            rtt=${out##*= }
            rtt=${rtt%% *}
            step bench-net-ping OK "count=$B_PINGS min_avg_max_ms=$rtt"
            ;;
        *) step bench-net-ping FAIL "no reply from $PEER_IP" ;;
    esac
    # The boot's first TCP connect() fills the kernel's 256 KiB table of
    # source-port perturbations from the random-number generator (Linux's
    # inet_hash_connect): seconds of emulated ChaCha20 on a software-KVM host.
    # Its own step, so the transfers below time the transfers.
    timed net-connect "" -- net_connect
    nb=$((B_NET_KIB << 10))
    timed net-rx "bytes=$nb" -- net_rx
    # The source file is in tmpfs, written before the clock starts.
    dd if=/dev/zero of=/tmp/lgj-net bs=1K count="$B_NET_KIB" 2>/dev/null
    timed net-tx "bytes=$nb" -- net_tx
    rm -f /tmp/lgj-net
}

# (Functions, so that their redirections are not timed()'s own.)
net_connect() {
    nc "$PEER_IP" "$NET_TX_PORT" < /dev/null > /dev/null
}

net_rx() {
    nc "$PEER_IP" "$NET_RX_PORT" < /dev/null > /dev/null
}

net_tx() {
    nc "$PEER_IP" "$NET_TX_PORT" < /tmp/lgj-net > /dev/null
}

bench_rng() {
    if [ ! -c /dev/hwrng ]; then
        step bench-rng SKIP "no /dev/hwrng"
        return
    fi
    timed rng "bytes=$((B_RNG_KIB << 10))" -- \
        timeout 60 dd if=/dev/hwrng of=/dev/null bs=1K count="$B_RNG_KIB" iflag=fullblock
}

# B_PROCS pipelines of three processes each (fork+exec of busybox applets).
pipelines() {
    _i=0
    while [ "$_i" -lt "$B_PROCS" ]; do
        echo "lgj $_i" | md5sum | cut -c1-8 > /dev/null || return 1
        _i=$((_i + 1))
    done
}

bench_proc() {
    timed proc-pipelines "pipelines=$B_PROCS processes=$((B_PROCS * 3))" -- pipelines
}

bench() {
    step bench-config OK "mib=$B_MIB buf_mib=$B_BUF_MIB rand=$B_RAND net_kib=$B_NET_KIB pings=$B_PINGS rng_kib=$B_RNG_KIB procs=$B_PROCS flush_kib=$B_FLUSH_KIB groups=$(for g in $B_GROUPS; do printf %s, "$g"; done)"
    for g in $B_GROUPS; do
        uptime_now
        echo "LGJ-BENCH-BEGIN $g $UPTIME"
        case $g in
            blk) bench_blk ;;
            net) bench_net ;;
            rng) bench_rng ;;
            proc) bench_proc ;;
            *) step "bench-$g" FAIL "unknown group" ;;
        esac
        uptime_now
        echo "LGJ-BENCH-END $g $UPTIME"
    done
}

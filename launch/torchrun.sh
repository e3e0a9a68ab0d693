#!/usr/bin/env bash
# One node, several processes, elastic restarts: `dcscale train` under torchrun.
#
#   launch/torchrun.sh [--nproc-per-node N] [--max-restarts R] [--port P] -- --config FILE [key=value ...]
#
#   --nproc-per-node N   processes (one per GPU); default: the GPUs nvidia-smi lists, or 1 without GPUs
#   --max-restarts R     how many times torchrun restarts the whole group after a worker dies (default 3)
#   --port P             rendezvous port on localhost (default: a free one, torchrun --standalone)
#
# Everything after `--` goes to `dcscale train`. `resume=auto` is appended: when a worker dies,
# torchrun stops the others and starts the group again, and the new group continues from the
# run's newest checkpoint (set checkpoint.every_steps so that little work is lost). Python is
# $PYTHON (default: python).
#
# Before torchrun starts, `dcscale train --check` checks the config and everything the run opens once
# (shard sets, checkpoints, the network for the images, the run directory, options for N processes): a bad input is one line and exit 2, not an error from every rank and
# --max-restarts restarts that fail the same way. Threads: OMP_NUM_THREADS if you set it, else the
# cores this script may use divided by the processes (torchrun alone would set 1).
#
# The same thing by hand:
#
#   export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
#   torchrun --nnodes 1 --nproc-per-node 8 --max-restarts 3 \
#       --rdzv-backend c10d --rdzv-endpoint localhost:29400 --rdzv-id dcscale \
#       -m dcscale train --config configs/imagenet_alexnet.yaml checkpoint.every_steps=1000 resume=auto
#
# Why TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default the workers' process group reuses the TCP
# store of torchrun's rendezvous; after a restart the new gloo group then fails to connect
# ("Gloo connectFullMesh failed ... Connection refused") and the run dies instead of resuming.
# With it set, every rendezvous round gets its own store (on NCCL as well; it costs nothing). The
# c10d rendezvous itself lives in the torchrun agent, so it survives the workers dying.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

nproc=""
max_restarts=3
port=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc-per-node|--nproc_per_node) nproc="${2:?--nproc-per-node needs a value}"; shift 2 ;;
        --nproc-per-node=*) nproc="${1#*=}"; shift ;;
        --max-restarts|--max_restarts) max_restarts="${2:?--max-restarts needs a value}"; shift 2 ;;
        --max-restarts=*) max_restarts="${1#*=}"; shift ;;
        --port) port="${2:?--port needs a value}"; shift 2 ;;
        --port=*) port="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "launch/torchrun.sh: error: unknown option $1 (train arguments go after --; see --help)" >&2; exit 2 ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "launch/torchrun.sh: error: no train arguments (expected -- --config FILE [key=value ...])" >&2; exit 2
fi
for arg in "$@"; do
    if [[ "$arg" == resume=* && "$arg" != "resume=auto" ]]; then
        echo "launch/torchrun.sh: error: $arg: restarts need resume=auto (to start from a checkpoint," \
             "copy it to <output.dir>/checkpoints/last.pt)" >&2
        exit 2
    fi
done
if [[ -z "$nproc" ]]; then
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$nproc" -ge 1 ]] || nproc=1
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "launch/torchrun.sh: error: --nproc-per-node $nproc: expected an integer >= 1" >&2; exit 2; }
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "launch/torchrun.sh: error: --max-restarts $max_restarts: expected an integer >= 0" >&2; exit 2; }

if [[ -n "$port" ]] && ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ && "$port" -le 65535 ]]; then
    echo "launch/torchrun.sh: error: --port $port: expected a port number from 1 to 65535" >&2; exit 2
fi
if [[ -n "$port" ]]; then
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "localhost:$port" --rdzv-id "dcscale-$port")
else
    rdzv=(--standalone)
fi
python_bin="${PYTHON:-python}"
"$python_bin" -m dcscale train --check --nproc "$nproc" "$@" resume=auto || exit $?

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(command nproc)  # (coreutils: the cores this process may run on)
    threads=$(( cores / nproc )); [[ "$threads" -ge 1 ]] || threads=1
    export OMP_NUM_THREADS=$threads
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
echo "launch/torchrun.sh: $nproc process(es) x $OMP_NUM_THREADS thread(s), up to $max_restarts restart(s)," \
     "resume=auto" >&2
exec "$python_bin" -m torch.distributed.run --nnodes 1 --nproc-per-node "$nproc" \
    --max-restarts "$max_restarts" "${rdzv[@]}" -m dcscale train "$@" resume=auto

"""Starting and joining a tensor-parallel group with torch.distributed (launched by torchrun).

`gyrfalcon generate|serve|eval|chat --tp N` outside a torchrun group re-runs itself under
`torch.distributed.run` (N processes on this machine); inside one (started by us or by the user's own torchrun,
multi-node included) it joins it. NCCL on GPUs, gloo on CPUs.

Failure handling, so that a dead rank never leaves the others hanging:
* torchrun watches its workers (every 0.1 s here) and, when one exits abnormally, stops the others (SIGTERM,
  then SIGKILL) and reports the failure; `relaunch` turns that report into one line naming the rank and signal;
* the compute collectives have a bounded timeout (`GYRFALCON_TP_TIMEOUT`, default 120 s), so a peer that stops
  answering without dying (a hung host in a multi-node run) still ends in an error;
* rank 0's step headers travel on a separate gloo group with a long timeout: followers wait there while a server
  sits idle, which may be hours.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

from .shard import TensorParallelError

_ENV_TIMEOUT = "GYRFALCON_TP_TIMEOUT"
_IDLE_TIMEOUT = timedelta(days=30)  # followers waiting for rank 0's next step


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or anything that sets the same env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_args(nproc: int, module: str, argv: list[str], monitor_interval: float = 0.1) -> list[str]:
    """torch.distributed.run arguments that start `python -m module argv...` on `nproc` local processes."""
    return ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--monitor-interval", str(monitor_interval), "-m", module, *argv]


def relaunch(argv: list[str], nproc: int, command: str = "gyrfalcon") -> int:
    """Run `gyrfalcon argv...` as a torchrun group of `nproc` local processes; return the exit status.

    Rank 0's own error messages reach the terminal as they are; a rank that died (a signal, or an error on a
    follower) is reported here in one line, after torchrun has stopped the rest of the group.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(torchrun_args(nproc, "gyrfalcon.cli", argv))
    try:
        run(args)
    except ChildFailedError as exc:
        return _report_failure(exc, command)
    return 0


def _report_failure(exc, command: str) -> int:
    failures = sorted(exc.failures.items())
    code = 1
    parts = []
    for rank, f in failures:
        if f.exitcode < 0:
            try:
                sig = signal.Signals(-f.exitcode).name
            except ValueError:
                sig = f"signal {-f.exitcode}"
            parts.append(f"rank {rank} (pid {f.pid}) was killed by {sig}")
        else:
            parts.append(f"rank {rank} (pid {f.pid}) exited with status {f.exitcode}")
            if rank == 0 and len(failures) == 1:
                code = f.exitcode  # rank 0 has printed its own error: keep its status, add nothing
    if not (len(failures) == 1 and failures[0][0] == 0 and failures[0][1].exitcode > 0):
        print(f"{command}: error: tensor-parallel group stopped: {'; '.join(parts)}", file=sys.stderr)
    return code


@dataclass
class Group:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    local_rank: int
    compute: object  # process group of the model's collectives
    control: object  # gloo group of rank 0's step headers (long timeout)
    device: object  # torch.device of this rank


def init_group(expected_world: int, device: str | None = None) -> Group:
    """Join the torchrun group this process was started in (env://): NCCL with one GPU per local rank when CUDA is
    there (and `device` is not "cpu"), else gloo on the CPU."""
    import torch
    import torch.distributed as dist

    if not in_torchrun():
        raise TensorParallelError("--tp: not inside a torchrun group (RANK/WORLD_SIZE/MASTER_ADDR are not set)")
    world = int(os.environ["WORLD_SIZE"])
    if world != expected_world:
        raise TensorParallelError(f"--tp {expected_world} but this torchrun group has {world} processes")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and (device is None or not str(device).startswith("cpu"))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    timeout = timedelta(seconds=float(os.environ.get(_ENV_TIMEOUT, "120")))
    if not dist.is_initialized():
        extra = {"device_id": dev} if use_cuda else {}  # NCCL: bind the communicator to this rank's GPU at once
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **extra)
    compute = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    return Group(rank, world, local_rank, compute, control, dev)

"""Scale-out: tensor parallelism over torchrun processes, a pipeline device map, a compiled decode step.

    load_parallel_model(dir, config, rank, world, group, dtype, device)  # this rank's slice, parallel modules
    Leader(model, control_group).install() / follow(model, control_group, device)   # rank 0 leads
    dispatch(model, "auto")     # layers spread over the visible devices (a no-op with one)
    compile_decode(model)       # torch.compile of the one-token step

The commands: `gyrfalcon generate|chat|serve|eval ... --tp N | --device-map auto | --compile` (cli.py).
"""

from .shard import Split, TensorParallelError, plan_split

__all__ = ["Split", "TensorParallelError", "plan_split"]

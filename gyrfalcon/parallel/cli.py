"""The command-line face of gyrfalcon.parallel: `--tp`, `--device-map`, `--compile` on the model commands.

    gyrfalcon generate "To be" --tp 2        # relaunches itself as a 2-process torchrun group
    torchrun --nproc-per-node 8 -m gyrfalcon.cli serve MODEL --tp 8   # or join a group you started
    gyrfalcon generate "To be" --device-map auto   # layers spread over the visible devices
    gyrfalcon generate "To be" --compile           # torch.compile'd decode step
"""

from __future__ import annotations

import argparse
import sys


def _tp(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the number of tensor-parallel ranks must be an integer >= 1")
    return v


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out")
    g.add_argument("--tp", type=_tp, default=1, metavar="N",
                   help="tensor parallelism over N processes (one per GPU; gloo processes on CPU): relaunches under "
                        "torchrun, or joins the torchrun group it runs in")
    g.add_argument("--device-map", choices=["auto"],
                   help="auto: spread the layers over the visible GPUs (pipeline; one device works at a time)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")


def maybe_relaunch(args: argparse.Namespace, argv: list[str] | None) -> int | None:
    """With --tp N > 1 outside a torchrun group: run this same command as a group; return its exit status.
    None: carry on in this process."""
    from .launch import in_torchrun, relaunch

    tp = getattr(args, "tp", 1)
    if tp <= 1 or in_torchrun():
        return None
    _preflight(args)
    return relaunch(list(sys.argv[1:] if argv is None else argv), tp, f"gyrfalcon {args.command}")


def _preflight(args: argparse.Namespace):
    """What can be refused before starting N processes (each would print the same error): conflicting options, and
    a model the split does not fit (Falcon-Mamba, heads or KV groups that do not divide). Returns the model dir."""
    from ..api import DEFAULT_MODEL
    from ..config import load_config
    from ..weights import resolve_model_dir
    from .shard import plan_split

    if getattr(args, "device_map", None):
        raise ValueError("--tp and --device-map are two ways to split a model: give one")
    if getattr(args, "adapter", None):
        raise ValueError("--adapter with --tp is not supported: merge the adapter into the weights first")
    path = getattr(args, "model_pos", None) or args.model
    model_dir = resolve_model_dir(path if path is not None else DEFAULT_MODEL, revision=args.revision)
    plan_split(load_config(model_dir), args.tp, 0)
    return model_dir


def load_tensor_parallel(args: argparse.Namespace):
    """`_load` for --tp N > 1 inside the torchrun group. On a follower rank this does not return: it follows rank
    0's forward passes and exits when rank 0 is done."""
    from ..api import LLM, default_dtype, parse_dtype
    from ..config import load_config
    from ..tokenizer import Tokenizer
    from .follow import Leader, follow, release_groups
    from .launch import init_group
    from .load import load_parallel_model

    model_dir = _preflight(args)  # again: a group started by the user's own torchrun skipped the launcher's
    config = load_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)  # before joining: a bad model dir fails alone, with its own error
    group = init_group(args.tp, args.device)
    dtype = parse_dtype(args.dtype) or default_dtype(group.device)
    model = load_parallel_model(model_dir, config, group.rank, group.world, group.compute, dtype, group.device,
                                getattr(args, "quantize", None), getattr(args, "skip", ()))
    if getattr(args, "compile", False):
        from .compile import compile_decode

        compile_decode(model)
    if group.rank != 0:
        follow(model, group.control, group.device)
        release_groups(model)
        sys.exit(0)
    Leader(model, group.control).install()
    return LLM(model, tokenizer, config, model_dir)


def apply_scale_out(llm, args: argparse.Namespace):
    """--device-map / --compile on a model loaded in this one process."""
    if getattr(args, "device_map", None):
        from .pipeline import dispatch

        dispatch(llm.model, args.device_map)
    if getattr(args, "compile", False):
        from .compile import compile_decode

        compile_decode(llm.model)
    return llm

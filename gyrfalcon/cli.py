"""The `gyrfalcon` command: one table of subcommands, each with its arguments and a run function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad command-line input: reported with the usage line, no traceback."""


def _model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model dir or hub id (default: bundled model)")
    p.add_argument("--model", "-m", help="model dir or hub id (default: the bundled tiny Shakespeare Falcon)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    p.add_argument("--quantize", choices=["int8", "llm.int8", "nf4", "fp4"],
                   help="quantize the weights while loading (the output head stays 8-bit); a checkpoint written by "
                        "`gyrfalcon quantize` needs no flag")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="with --quantize: keep this module in full precision (name, suffix such as lm_head, or "
                        "pattern; repeatable or comma-separated)")
    p.add_argument("--adapter", metavar="DIR",
                   help="apply a LoRA adapter (PEFT format, e.g. from `gyrfalcon finetune`): merged into a float "
                        "model, kept separate over a quantized one")
    from .parallel.cli import add_parallel_arguments

    add_parallel_arguments(p)  # --tp, --device-map, --compile


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=200)
    p.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")


def _sampling_params(args: argparse.Namespace, **extra):
    from .runtime.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
        ignore_eos=args.ignore_eos, **extra,
    )


def _load(args: argparse.Namespace):
    from .api import load

    if getattr(args, "tp", 1) > 1:  # inside the torchrun group (main relaunched us): this rank's slice
        from .parallel.cli import load_tensor_parallel

        return load_tensor_parallel(args)
    model = getattr(args, "model_pos", None) or args.model
    llm = load(model, device=args.device, dtype=args.dtype, revision=args.revision,
               quantize=getattr(args, "quantize", None), skip=getattr(args, "skip", ()),
               adapter=getattr(args, "adapter", None))
    if getattr(args, "device_map", None) or getattr(args, "compile", False):
        from .parallel.cli import apply_scale_out

        apply_scale_out(llm, args)
    return llm


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    _model_args(p)
    _sampling_args(p, temperature=0.8)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object per sequence: text and token ids")


def run_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("give a prompt as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise UsageError("the prompt is empty")
    params = _sampling_params(args, num_return_sequences=args.num_return_sequences)
    llm = _load(args)
    if args.json:
        for c in llm.generate(prompt, params):
            print(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                              "prompt_tokens": c.prompt_tokens, "seed": c.seed}, ensure_ascii=False))
        return 0
    many = params.num_return_sequences > 1
    if many:  # interleaved streams would be unreadable: print each sequence whole
        for i, c in enumerate(llm.generate(prompt, params)):
            print(f"--- sequence {i}")
            print(prompt + c.text)
        return 0
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for ev in llm.stream(prompt, params):
        out.write(ev.text)
        out.flush()
    out.write("\n")
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _sampling_args(p, temperature=0.7)
    p.add_argument("--system", help="system message")


def run_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    # The model should stop where it would start writing the user's next turn.
    params = _sampling_params(args)
    stops = tuple(params.stop) + ("\nUser:",)
    from dataclasses import replace

    params = replace(params, stop=stops)
    if interactive:
        print("gyrfalcon chat: type a message; /reset clears the conversation, /exit or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.chat_prompt(history)
        reply = []
        if interactive:
            sys.stdout.write("Assistant:")
        for ev in llm.stream(prompt, params):
            reply.append(ev.text)
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model dir, config.json or hub id")
    p.add_argument("--model", "-m")
    p.add_argument("--revision")
    p.add_argument("--context", type=int, default=2048, help="sequence length for the KV-cache column")
    p.add_argument("--json", action="store_true")


def run_info(args: argparse.Namespace) -> int:
    from .info import describe, format_info

    report = describe(getattr(args, "model_pos", None) or args.model, revision=args.revision, context=args.context)
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train.cli import add_train_arguments

    add_train_arguments(p)


def run_train(args: argparse.Namespace) -> int:
    from .train.cli import run_train as run

    return run(args)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    from .finetune.cli import add_finetune_arguments

    add_finetune_arguments(p)


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune.cli import run_finetune as run

    return run(args)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from .server.cli import add_serve_arguments

    add_serve_arguments(p)


def run_serve(args: argparse.Namespace) -> int:
    from .server.cli import run_serve as run

    return run(args)


def _quantize_args(p: argparse.ArgumentParser) -> None:
    from .quant.cli import add_quantize_arguments

    add_quantize_arguments(p)


def run_quantize(args: argparse.Namespace) -> int:
    from .quant.cli import run_quantize as run

    return run(args)


def _bench_args(p: argparse.ArgumentParser) -> None:
    from .bench import add_bench_arguments

    add_bench_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench as run

    return run(args)


def _merge_args(p: argparse.ArgumentParser) -> None:
    from .finetune.merge import add_merge_arguments

    add_merge_arguments(p)


def run_merge(args: argparse.Namespace) -> int:
    from .finetune.merge import run_merge as run

    return run(args)


def _eval_args(p: argparse.ArgumentParser) -> None:
    from .eval.cli import add_arguments

    add_arguments(p)


def run_eval(args: argparse.Namespace) -> int:
    from .eval.cli import run

    return run(args)


Args = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Args, Run]] = {
    "generate": ("generate text from a prompt (argument or stdin), streamed to the terminal",
                 _generate_args, run_generate),
    "chat": ("interactive multi-turn chat (a terminal or a pipe: one user message per line)", _chat_args, run_chat),
    "info": ("describe a model: layout, parameters, weight bytes, KV-cache bytes (the config alone is enough)",
             _info_args, run_info),
    "train": ("train a Falcon or Falcon-Mamba from scratch on a text file", _train_args, run_train),
    "finetune": ("LoRA / QLoRA / full fine-tuning on chat or instruction data (PEFT adapters), or continued "
                 "pretraining", _finetune_args, run_finetune),
    "serve": ("serve a model over HTTP: TGI and OpenAI APIs, continuous batching, a chat page at /",
              _serve_args, run_serve),
    "quantize": ("quantize a checkpoint to int8 / nf4 / fp4 and write it (loads later with no flag)",
                 _quantize_args, run_quantize),
    "bench": ("measure memory, load time and generation speed per quantization mode (JSON, CSV, PNG, table)",
              _bench_args, run_bench),
    "merge": ("fold a LoRA adapter into its base model and write an ordinary checkpoint (optionally quantized)",
              _merge_args, run_merge),
    "eval": ("score Open LLM Leaderboard tasks (ARC, HellaSwag, MMLU, TruthfulQA, WinoGrande, GSM8K) and "
             "perplexity, with lm-eval's numbers", _eval_args, run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gyrfalcon", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gyrfalcon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _run) in COMMANDS.items():
        # "resolve": a command that defines a shared option itself (eval's --quantize) overrides _model_args' one.
        sp = sub.add_parser(name, help=help_text, description=help_text, conflict_handler="resolve")
        add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    runner = COMMANDS[args.command][2]
    try:
        if getattr(args, "tp", 1) > 1:  # outside a torchrun group: run this command as one
            from .parallel.cli import maybe_relaunch

            status = maybe_relaunch(args, argv)
            if status is not None:
                return status
        return runner(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError) as exc:  # our errors (config, weights, tokenizer, params) are ValueErrors
        parser.exit(2, f"gyrfalcon {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())

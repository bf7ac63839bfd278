"""The `pipeserve` command: generate, serve, worker, bench throughput, bench serve, plan."""

from __future__ import annotations

import argparse
import sys

from pipeserve.entrypoints.engine_flags import add_cluster_flags, add_engine_flags, engine_kwargs

DEFAULT_PROMPTS = [
    "What is pipeline parallelism in one paragraph?",
    "Write a haiku about a river.",
    "List three uses of a paperclip.",
]


def _generate(args: argparse.Namespace) -> None:
    from pipeserve import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, top_p=args.top_p,
                            seed=args.sampling_seed)
    prompts = args.prompt or DEFAULT_PROMPTS
    with LLM(args.model, **engine_kwargs(args)) as llm:
        tok = llm.get_tokenizer()
        inputs = []
        for p in prompts:
            if args.raw or tok is None or not getattr(tok, "chat_template", None):
                inputs.append(p)
            else:
                text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True)
                inputs.append({"prompt_token_ids": tok.encode(text, add_special_tokens=False), "prompt": text})
        for prompt, inp in zip(prompts, inputs, strict=True):
            print(f"\n>>> {prompt}\n", flush=True)
            out = llm.generate([inp], params, on_output=_TextPrinter())[0]
            print(f"\n[{len(out.outputs[0].token_ids)} tokens, finish_reason={out.outputs[0].finish_reason}]")


class _TextPrinter:
    """Writes each new piece of a request's cumulative text to stdout as it arrives."""

    def __init__(self) -> None:
        self.printed = 0

    def __call__(self, _: int, out) -> None:
        text = out.outputs[0].text
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeserve", description="A pipeline-parallel LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for a few prompts, streaming it to the terminal")
    add_engine_flags(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); default: three built-in ones")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.set_defaults(func=_generate)

    from pipeserve.entrypoints.openai.cli_args import add_serve_parser

    add_serve_parser(sub)

    worker = sub.add_parser("worker", help="host this machine's ranks of a multi-node engine (headless); stays up "
                                           "for the engine's whole life and starts replacements when ranks die")
    add_cluster_flags(worker)
    worker.add_argument("--connect-timeout", type=float, default=60.0,
                        help="seconds to wait for the head, at start and again whenever it goes away (a restarted "
                             "head is served by the same worker)")
    worker.set_defaults(func=_worker)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput on random-token prompts")
    add_engine_flags(tp)
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--output-json", default=None)
    tp.set_defaults(func=_bench_throughput)

    from pipeserve.bench.serve import add_bench_serve_parser

    add_bench_serve_parser(bench_sub)

    from pipeserve.entrypoints.plan_cmd import add_plan_parser

    add_plan_parser(sub)
    return parser


def _worker(args: argparse.Namespace) -> None:
    from pipeserve.control.node_agent import run_node_agent

    if args.node_rank < 1 or args.nnodes < 2 or args.master_port is None or not args.cluster_key:
        raise ValueError("pipeserve worker needs --nnodes >= 2, --node-rank >= 1, --master-addr, --master-port "
                         "and --cluster-key")
    try:
        code = run_node_agent(args.master_addr, args.master_port, args.node_rank, args.cluster_key,
                              args.connect_timeout)
    except ConnectionError as exc:
        raise ValueError(str(exc)) from None
    sys.exit(code)


def _bench_throughput(args: argparse.Namespace) -> None:
    from pipeserve.bench.throughput import run_throughput

    run_throughput(args.model, engine_kwargs(args), args.input_len, args.output_len, args.num_prompts,
                   args.output_json)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        sys.exit(f"pipeserve: error: {exc}")


if __name__ == "__main__":
    main()

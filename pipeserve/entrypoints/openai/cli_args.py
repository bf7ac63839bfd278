"""The `pipeserve serve` sub-command: its flags, and the hand-off to the launcher."""

from __future__ import annotations

import argparse
import os
import sys

from pipeserve.entrypoints.engine_flags import add_engine_flags, engine_kwargs


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """`pipeserve serve [MODEL] [server flags] [engine flags]`."""
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (completions, chat, metrics)")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="HF folder, .gguf file, or 'smollm2-135m-instruct' (default); same as --model")
    add_engine_flags(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    s.add_argument("--api-key", default=os.environ.get("PIPESERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PIPESERVE_API_KEY, else none)")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the model argument)")
    s.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body accepted; larger ones get 413 (default: 4 MiB)")
    s.add_argument("--sse-keepalive-s", type=float, default=None,
                   help="send an SSE comment on a stream silent this long, e.g. while a failed stage is replaced "
                        "(default: 5)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--disable-access-log", action="store_true", help="do not log one line per HTTP request")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from pipeserve.engine.arg_utils import EngineArgs
    from pipeserve.entrypoints.openai.api_server import DEFAULT_MAX_REQUEST_BYTES, ServeSettings
    from pipeserve.entrypoints.openai.launcher import run_server
    from pipeserve.entrypoints.openai.streams import DEFAULT_SSE_KEEPALIVE_S
    from pipeserve.loader.default_model import DEFAULT_MODEL_ALIAS

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    model = args.model_tag or args.model
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    max_bytes = args.max_request_bytes if args.max_request_bytes is not None else DEFAULT_MAX_REQUEST_BYTES
    if max_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {max_bytes}")
    keepalive = args.sse_keepalive_s if args.sse_keepalive_s is not None else DEFAULT_SSE_KEEPALIVE_S
    if keepalive <= 0:
        raise ValueError(f"--sse-keepalive-s must be > 0, got {keepalive}")
    settings = ServeSettings(served_model_names=args.served_model_name or [model or DEFAULT_MODEL_ALIAS],
                             host=args.host, port=args.port, api_key=args.api_key or None,
                             max_request_bytes=max_bytes, sse_keepalive_s=keepalive)
    code = run_server(EngineArgs(model=model, **engine_kwargs(args)), settings, args.log_level,
                      access_log=not args.disable_access_log)
    if code:
        sys.exit(code)

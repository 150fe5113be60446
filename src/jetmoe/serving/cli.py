"""`jetmoe serve`: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_KEEP_ALIVE_S = 5.0


def run_serve(args) -> int:
    import uvicorn

    from jetmoe.generation.model_options import build_engine

    from .app import create_app
    from .auth import is_loopback

    engine = build_engine(args, max_batch=args.max_batch)
    name = args.served_model_name or (args.model.rstrip("/").split("/")[-1] if args.model else "jetmoe-tiny")
    app = create_app(
        engine,
        name,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        body_timeout=args.body_timeout,
        api_key=args.api_key,
    )
    if not args.api_key and not is_loopback(args.host):
        print(
            f"jetmoe serve: WARNING: listening on {args.host} without an API key: anyone who reaches this port "
            "can use the model (set --api-key or JETMOE_API_KEY)",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"jetmoe serve: model '{name}' on http://{args.host}:{args.port}/v1 (max batch {args.max_batch})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=args.keep_alive_timeout,
        limit_concurrency=args.max_connections,
    )
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def register(subparsers) -> None:
    from jetmoe.generation.model_options import add_model_arguments

    from .request_body import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES

    serve = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API (completions, chat).",
    )
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the directory name)"
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("JETMOE_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $JETMOE_API_KEY; none: open)",
    )
    serve.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    serve.add_argument(
        "--queue-timeout", type=float, default=30.0, help="seconds a request may wait for a slot before 503"
    )
    serve.add_argument(
        "--max-tokens-limit", type=int, default=None, help="largest max_tokens accepted (default: the context)"
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_positive(int),
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request body; larger ones get 413 (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive(float),
        default=DEFAULT_BODY_TIMEOUT_S,
        help=f"seconds for a request body to arrive before 408 (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    serve.add_argument(
        "--keep-alive-timeout",
        type=_positive(float),
        default=DEFAULT_KEEP_ALIVE_S,
        help=f"seconds an idle keep-alive connection stays open (default {DEFAULT_KEEP_ALIVE_S:g})",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive(int),
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"open connections and requests at once; beyond that uvicorn answers 503 "
        f"(default {DEFAULT_MAX_CONNECTIONS})",
    )
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=run_serve)

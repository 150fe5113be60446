"""`jetmoe serve`: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

import sys


def run_serve(args) -> int:
    import uvicorn

    from jetmoe.generation.model_options import build_engine

    from .app import create_app

    engine = build_engine(args, max_batch=args.max_batch)
    name = args.served_model_name or (args.model.rstrip("/").split("/")[-1] if args.model else "jetmoe-tiny")
    app = create_app(
        engine, name, max_queue=args.max_queue, queue_timeout=args.queue_timeout, max_tokens_limit=args.max_tokens_limit
    )
    print(
        f"jetmoe serve: model '{name}' on http://{args.host}:{args.port}/v1 (max batch {args.max_batch})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def register(subparsers) -> None:
    from jetmoe.generation.model_options import add_model_arguments

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
    serve.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    serve.add_argument(
        "--queue-timeout", type=float, default=30.0, help="seconds a request may wait for a slot before 503"
    )
    serve.add_argument(
        "--max-tokens-limit", type=int, default=None, help="largest max_tokens accepted (default: the context)"
    )
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=run_serve)

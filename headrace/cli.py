"""`headrace` command line: serve, run-batch, bench, and one entry per service process (for containers).

    headrace serve [engine flags] [server flags]     every process on this host, under one supervisor
    headrace run-batch -i in.jsonl -o out.jsonl      offline OpenAI Batch API files
    headrace bench {latency,throughput,serve,structured,specdec} ...    benchmarks (print numbers, write JSON)
    headrace {api,tokenizer,scheduler,worker} ...    one service process (compose.yaml runs these)
    headrace keygen FILE                             a new CURVE key for the engine's tcp sockets
"""

from __future__ import annotations

import argparse
import importlib
import sys

from headrace.common.config import ConfigError
from headrace.common.version import VERSION
from headrace.config_args import add_engine_args, add_server_args, engine_config_from_args
from headrace.service_entries import SERVICE_ENTRIES, run_service

BENCHMARKS = ("latency", "throughput", "serve", "structured", "specdec")  # modules of headrace.bench


def _service_parser(sub, name: str, help_text: str, indexed: bool) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    add_engine_args(p)
    add_server_args(p)
    if indexed:
        p.add_argument("--index", type=int, default=0, help="this process's index (tokenizer/api instance; "
                       "scheduler: its data-parallel replica; worker: replica * tensor-parallel size + rank)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace", description="Serve LLMs over an OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"headrace {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the whole pipeline on this host")
    serve.add_argument("model_tag", nargs="?", default=None, help="model (same as --model)")
    add_engine_args(serve)
    add_server_args(serve)

    batch = sub.add_parser("run-batch", help="run an OpenAI Batch API JSONL file offline")
    batch.add_argument("-i", "--input-file", required=True)
    batch.add_argument("-o", "--output-file", required=True)
    add_engine_args(batch)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name in BENCHMARKS:
        bench_sub.add_parser(name, help=f"{name} benchmark", add_help=False)

    _service_parser(sub, "api", "one API server process", indexed=True)
    _service_parser(sub, "tokenizer", "one tokenizer process", indexed=True)
    scheduler = _service_parser(sub, "scheduler", "the scheduler process (of one replica)", indexed=True)
    scheduler.add_argument("--create-curve-key", action="store_true",
                           help="first write a new key to --engine-curve-key-file if that file is missing "
                                "(compose's scheduler does, before every other service starts)")
    _service_parser(sub, "worker", "one GPU worker process (rank = --index)", indexed=True)

    keygen = sub.add_parser("keygen", help="write a new CURVE key for the engine's tcp sockets")
    keygen.add_argument("file", help="where to write it (owner-only; an existing file is never replaced)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ConfigError as e:  # a bad flag combination: one line, like argparse's own errors
        print(f"headrace: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Benchmarks own their flags (spelled as vLLM's): hand them the rest of the line untouched.
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        return int(importlib.import_module(f"headrace.bench.{argv[1]}").main(argv[2:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        if args.model_tag and not args.model:
            args.model = args.model_tag
        from headrace.launcher import serve

        return serve(engine_config_from_args(args))
    if args.command == "run-batch":
        from headrace.run_batch import run_batch

        return run_batch(engine_config_from_args(args), args.input_file, args.output_file)
    if args.command in SERVICE_ENTRIES:
        return _run_one_service(args)
    if args.command == "keygen":
        from headrace.common.curve import write_new_key_file

        write_new_key_file(args.file)
        print(f"wrote a new engine key to {args.file}; point --engine-curve-key-file (or "
              "HEADRACE_ENGINE_CURVE_KEY_FILE) of every process at it")
        return 0
    return 2


def _run_one_service(args: argparse.Namespace) -> int:
    """One service process on its own (compose): it resolves the model itself, as the launcher would."""
    from headrace.common.models.resolve import resolve_engine_config
    from headrace.common.models.source import ModelNotFoundError

    try:
        config = resolve_engine_config(engine_config_from_args(args))
    except (ValueError, ModelNotFoundError) as e:
        print(f"headrace: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "create_curve_key", False):
        _create_curve_key(config.server.engine_curve_key_file)
    run_service(args.command, config.to_dict(), getattr(args, "index", 0))
    return 0


def _create_curve_key(path: str | None) -> None:
    from headrace.common.curve import create_key_file_if_missing

    if not path:
        raise ConfigError("--create-curve-key needs --engine-curve-key-file (where to write the key)")
    if create_key_file_if_missing(path):
        print(f"headrace: wrote a new engine key to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Starts llama-cpp-python's OpenAI-compatible server on an ephemeral loopback port.

The tests and the affinity benchmark run real engine servers behind `tether shard --engine
openai`; this binds 127.0.0.1:0 itself, prints `llama-cpp-server listening on
http://127.0.0.1:PORT` on stdout, and hands the live socket to uvicorn (no bind-drop-rebind).
Needs `pip install -r tests/python/engine-requirements.txt` (llama-cpp-python[server]).

    scripts/llama-cpp-server.py --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --alias smollm2-135m-instruct --n-ctx 2048 --threads 1

With `--verbose` (the default here) llama.cpp prints, per request, how many prompt tokens it
evaluated (`prompt eval time = ... ms / N tokens`) on stderr: the tests read that to see a
session's prefix reused.
"""

from __future__ import annotations

import argparse
import socket
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="GGUF model file")
    parser.add_argument("--alias", required=True, help="model name the server answers to")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    parser.add_argument(
        "--ram-cache",
        action="store_true",
        help="llama-cpp-python's RAM prompt cache: keep several prompts' KV states, not only the last",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-request llama.cpp timings on stderr")
    args = parser.parse_args()

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = ModelSettings(
        model=args.model,
        model_alias=args.alias,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        cache=args.ram_cache,
        cache_type="ram",
        verbose=not args.quiet,
    )
    app = create_app(server_settings=ServerSettings(host=args.host, port=0), model_settings=[model])

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    # The model is loaded (create_app loads it) and the socket listens: connections queue.
    print(f"llama-cpp-server listening on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=60)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

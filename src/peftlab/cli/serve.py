"""peftlab serve RUN_DIR [RUN_DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [batching and limits]"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys

from peftlab.cli._checks import PRECISIONS, non_negative_float
from peftlab.errors import UserError


# out of memory: what to lower (cli/__init__.py prints it in one line)
MEMORY_HINT = "lower --max-batch (texts per forward pass) or --max-chars, or serve fewer runs in one process"


def add_parser(sub):
    p = sub.add_parser("serve", help="serve trained runs over HTTP (many adapters over one frozen base)",
                       description="Serve completed runs over HTTP: POST /predict, GET /adapters, a web page at /, "
                                   "Prometheus /metrics; LoRA adapters over one base share forward passes. "
                                   "See docs/serving.md.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="completed run directories; each is served under its directory name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535, or 0 for any free one (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but / and /health, and enable the admin "
                        "routes (default: the PEFTLAB_API_KEY environment variable; unset: no key, no admin routes)")
    p.add_argument("--batch-window-ms", type=non_negative_float, default=5.0,
                   help="how long a request waits for others to share its forward pass (default: %(default)s ms)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="a forward pass closes once it holds this many texts (default: %(default)s)")
    p.add_argument("--mixed-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="run several LoRA adapters' requests in one forward pass (peft adapter_names); with "
                        "--no-mixed-batching one pass per adapter (default: on)")
    p.add_argument("--max-texts", type=int, default=128, help="texts per request (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=10_000,
                   help="characters per text; longer texts are refused (422), not cut (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="request body size; larger bodies get 413 (default: %(default)s)")
    p.add_argument("--max-queue-texts", type=int, default=1024,
                   help="texts waiting for a forward pass, per model in memory; a request that would go beyond is "
                        "answered 503 with Retry-After at once instead of waiting (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at once; one more is answered 503 and closed. Kept below the open-files "
                        "limit (ulimit -n) minus 64 for the server's own files (default: %(default)s)")
    p.add_argument("--header-timeout", type=non_negative_float, default=10.0, metavar="SECONDS",
                   help="a request's headers must arrive within this of its connection (or first byte), else 408 "
                        "and the connection is closed (default: %(default)s)")
    p.add_argument("--body-timeout", type=non_negative_float, default=30.0, metavar="SECONDS",
                   help="a request's whole body must arrive within this of its headers, else 408 and the connection "
                        "is closed (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the device multiplies bf16 in hardware (a bf16 GPU; a CPU with AVX512-BF16 or "
                        "AMX), else fp32 (default: %(default)s)")
    return p


def _positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")


RESERVED_FILES = 64  # file descriptors the server keeps for itself (model files, logs, the listening socket)


def connection_cap(wanted: int) -> int:
    """--max-connections, lowered (with a note) to what the open-files limit leaves: past it, accept()
    fails and every client, /health too, goes unanswered until the others leave."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft - RESERVED_FILES:
        return wanted
    cap = max(1, soft - RESERVED_FILES)
    print(f"peftlab serve: note: --max-connections {wanted} lowered to {cap}: the open-files limit (ulimit -n) is "
          f"{soft}", file=sys.stderr)
    return cap


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken now: a port in use is one line before anything loads."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a TCP port is 1-65535 (or 0 for any free one)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host!r}: not an address of this machine ({e}): use 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?): pick another with --port, "
                            f"or stop the other process") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --host or --port") from None
    return sock


def run(args) -> int:
    import torch
    import uvicorn

    from peftlab.serve.app import ServeSettings, check_api_key, create_app
    from peftlab.serve.batcher import BatchSettings
    from peftlab.serve.connections import ConnectionLimits, guarded_protocol

    _positive(args, "max_batch", "max_texts", "max_chars", "max_body_bytes", "max_queue_texts", "max_connections",
              "header_timeout", "body_timeout")
    if args.batch_window_ms < 0:
        raise UserError(f"--batch-window-ms {args.batch_window_ms}: must be 0 or more")
    key = args.api_key or os.environ.get("PEFTLAB_API_KEY") or None
    check_api_key(key)  # before anything is bound or loaded
    sock = bind(args.host, args.port)
    try:
        try:
            loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
        except ValueError:
            loopback = False
        if key is None and not loopback:
            print(f"peftlab serve: warning: listening on {args.host} without --api-key: anyone who can reach it "
                  f"can use it", file=sys.stderr)
        settings = ServeSettings(api_key=key, max_texts=args.max_texts, max_chars=args.max_chars,
                                 max_body_bytes=args.max_body_bytes, precision=args.precision,
                                 batch=BatchSettings(args.batch_window_ms / 1000, args.max_batch, args.mixed_batching,
                                                     args.max_queue_texts),
                                 connections=ConnectionLimits(connection_cap(args.max_connections),
                                                              args.header_timeout, args.body_timeout))
        try:
            device = torch.device(args.device) if args.device else None
        except RuntimeError:
            raise UserError(f"--device {args.device!r}: not a torch device (cpu, cuda, cuda:1, mps)") from None
        app = create_app(args.run_dirs, device, settings)
        port = sock.getsockname()[1]
        print(f"serving {len(args.run_dirs)} run(s) on http://{args.host}:{port}  (POST /predict, GET /adapters, "
              f"page at /; mixed batching {'on' if args.mixed_batching else 'off'})", flush=True)
        # h11 (not httptools): the protocol serve/connections.py guards; idle kept-alive connections close after 5 s
        uvicorn.Server(uvicorn.Config(app, log_level="warning", http=guarded_protocol(settings.connections),
                                      timeout_keep_alive=5)).run(sockets=[sock])
    finally:
        sock.close()
    return 0

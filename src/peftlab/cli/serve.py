"""peftlab serve RUN_DIR [RUN_DIR ...] [--host 127.0.0.1] [--port 8000]"""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("serve", help="serve trained runs over HTTP (many adapters over one frozen base)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p


def run(args) -> int:
    import uvicorn

    from peftlab.serve.app import create_app

    app = create_app(args.run_dirs)
    print(f"serving {len(args.run_dirs)} run(s) on http://{args.host}:{args.port}  (POST /predict, GET /adapters)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

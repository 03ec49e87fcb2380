"""peftlab export RUN_DIR --format merged|onnx --output DIR [--quantize int8]"""
from __future__ import annotations

import sys

from peftlab.errors import UserError


# out of memory: what to lower (cli/__init__.py prints it in one line)
MEMORY_HINT = "export on a machine with more free memory (the fp32 model is held while the export is checked)"


def add_parser(sub):
    p = sub.add_parser("export", help="a trained run as a plain Hugging Face folder (merged) or ONNX, no peft needed")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["merged", "onnx"],
                   help="merged: adapter folded into the weights, a transformers model folder; onnx: model.onnx for onnxruntime")
    p.add_argument("--output", required=True, help="a new (or empty) directory to write")
    p.add_argument("--quantize", choices=["int8"], help="onnx only: also write a dynamically quantized int8 model")
    return p


def _check_line(name: str, check: dict | None) -> str:
    if check is None:
        return f"  {name:<8} not checked (the run has no predictions.csv)"
    return (f"  {name:<8} test accuracy {check['accuracy']:.4f} on {check['rows']} rows; "
            f"max |p - run| {check['max_abs_diff_vs_run']:.2e}; same answer (label or label set) as the run {check['agreement_with_run']:.2%}")


def run(args) -> int:
    from peftlab.export import FORMATS

    if args.quantize and args.format != "onnx":
        raise UserError(f"--quantize {args.quantize} applies to --format onnx only: drop it, or use --format onnx")
    kwargs = {"quantize": args.quantize} if args.format == "onnx" else {}
    info = FORMATS[args.format](args.run_dir, args.output, **kwargs)
    for note in info["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"exported {info['method']} run {info['run_dir']} as {args.format} to {info['output']} in {info['seconds']:.1f}s")
    if info["run_test_accuracy"] is not None:
        print(f"  run      test accuracy {info['run_test_accuracy']:.4f}")
    print(_check_line("float" if args.format == "onnx" else "merged", info["check"]))
    if info.get("trust_remote_code"):
        print(f"  load it with trust_remote_code=True: its head reads the pooled sentence embedding, whose code "
              f"(peftlab_head.py) is in the folder (docs/export.md)")
    if "int8" in info:
        q = info["int8"]
        print(_check_line("int8", q["check"]) + f"; {q['bytes'] / 2**20:.1f} MiB vs {q['float_bytes'] / 2**20:.1f} MiB")
    return 0

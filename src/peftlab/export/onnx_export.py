"""`onnx`: the merged model as one ONNX graph with dynamic batch and sequence axes, for onnxruntime;
config.json (labels, problem type, decision rule) and the tokenizer beside it; optionally a dynamically
quantized int8 copy. The graph's output is the logits: softmax, or a sigmoid per label for a multi-label
run, is the caller's.

torch.onnx.export's dynamo exporter (torch.export + onnxscript) is the maintained path in torch 2.x;
the TorchScript one is deprecated and traces Python conditionals on shapes into constants. optimum
would pin transformers below 5, so it is not used."""
from __future__ import annotations

import importlib.util
import inspect
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from peftlab.errors import UserError
from peftlab.export.common import Source, check_output, compare, encoded, load_source, save_tokenizer, staged, \
    test_set, write_info

MODEL_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
QUANTIZE_CHOICES = ("int8",)


class _Logits(torch.nn.Module):
    """The classifier with plain tensors in and the logits out (the graph's one output)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def input_names(source: Source) -> list[str]:
    """input_ids and attention_mask, and token_type_ids where the tokenizer produces them and the model
    takes them, so a tokenizer's output can be fed to the session as it is."""
    names = ["input_ids", "attention_mask"]
    if ("token_type_ids" in source.tokenizer.model_input_names
            and "token_type_ids" in inspect.signature(source.model.forward).parameters):
        names.append("token_type_ids")
    return names


def export_graph(source: Source, path: Path) -> list[str]:
    names = input_names(source)
    # two examples of different lengths: batch and sequence both above 1, so torch.export keeps them symbolic
    example = source.tokenizer(["an example", "a somewhat longer example text"], padding=True, return_tensors="pt")
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # progress lines and "torchvision is not installed" notices
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_Logits(source.model), (), kwargs={n: example[n] for n in names},
                                        input_names=names, output_names=["logits"], dynamo=True, verbose=False,
                                        dynamic_shapes={n: {0: "batch", 1: "sequence"} for n in names})
    finally:
        onnx_logger.setLevel(level)
    program.save(str(path))  # weights go to an external .data file only past protobuf's 2 GB limit
    return names


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # share the machine as torch was told to
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess, source: Source, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Logits from an onnxruntime session, on the run's own tokenization; batches mix lengths (sorted,
    padded to the longest), as a real caller's would."""
    from peftlab.data.batching import collate

    data = encoded(source, texts)
    wanted = {i.name for i in sess.get_inputs()}
    order = np.argsort(-data.lengths, kind="stable")
    logits = np.zeros((len(texts), len(source.label_names)), np.float32)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = collate(data, index, source.pad_id, pad_to_multiple=1)
        feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        if "token_type_ids" in wanted:  # single texts: segment 0 throughout, as the tokenizer gives
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        logits[index] = sess.run(["logits"], feed)[0]
    return logits


def quantize_int8(source_path: Path, target: Path) -> None:
    """Dynamic quantization: int8 weights of MatMul/Gemm, activations quantized on the fly; no calibration
    data. One scale per output channel rather than per tensor: on a LoRA run of MiniLM on BBC News it kept
    test accuracy at the float model's (0.9281; per tensor 0.9213) and the largest probability change at
    0.027 (per tensor 0.106)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name("prepared.onnx")
    # onnx shape inference and graph clean-up, as onnxruntime advises before quantizing; its symbolic
    # pass cannot follow the dynamo exporter's graphs ("Incomplete symbolic shape inference") and is skipped
    quant_pre_process(str(source_path), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        prepared.unlink(missing_ok=True)


def _require_onnx_packages() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}, which is not installed: pip install 'peftlab[onnx]'")


def export_onnx(run_dir: str | Path, output: str | Path, quantize: str | None = None) -> dict:
    """Write model.onnx (+ model_quantized.onnx with quantize="int8"), config.json, tokenizer and
    export_info.json to `output`; returns what export_info.json records."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {quantize!r} is not supported: use --quantize {' or '.join(QUANTIZE_CHOICES)}, or leave it out")
    _require_onnx_packages()
    import onnx

    out = check_output(output)
    start = time.perf_counter()
    source = load_source(run_dir)
    with staged(out) as tmp:
        names = export_graph(source, tmp / MODEL_FILE)
        source.model.config.save_pretrained(tmp)  # id2label, problem_type, decision_rule for whoever reads the logits
        save_tokenizer(source, tmp)
        export_seconds = time.perf_counter() - start
        opset = next(o.version for o in onnx.load(str(tmp / MODEL_FILE), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        test = test_set(source)
        check = None if test is None else compare(onnx_logits(session(tmp / MODEL_FILE), source, test.texts), test, source)
        info = {"format": "onnx", **source.info(), "file": MODEL_FILE, "inputs": names, "outputs": ["logits"],
                "dynamic_axes": {"batch": 0, "sequence": 1}, "opset": opset, "check": check,
                "export_seconds": round(export_seconds, 2)}
        if quantize == "int8":
            begin = time.perf_counter()
            quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE)
            info["int8"] = {"file": INT8_FILE, "bytes": (tmp / INT8_FILE).stat().st_size,
                            "float_bytes": (tmp / MODEL_FILE).stat().st_size,
                            "quantize_seconds": round(time.perf_counter() - begin, 2),
                            "check": None if test is None else compare(
                                onnx_logits(session(tmp / INT8_FILE), source, test.texts), test, source)}
        info["files"] = sorted(p.name for p in tmp.iterdir())
        info["seconds"] = round(time.perf_counter() - start, 2)
        write_info(tmp, info)
    return {**info, "output": str(out)}

"""Export a trained run as a model that needs neither peft nor peftlab:

    export_merged(run_dir, output)                 Hugging Face folder (adapter merged, head, labels, tokenizer)
    export_onnx(run_dir, output, quantize=None)    model.onnx (+ int8 copy) with config.json and tokenizer

Both check the export against the run's own test predictions (predictions.csv) and record the result,
with timings, in export_info.json."""
from peftlab.export.merged import export_merged
from peftlab.export.onnx_export import export_onnx

FORMATS = {"merged": export_merged, "onnx": export_onnx}

__all__ = ["FORMATS", "export_merged", "export_onnx"]

"""Model FLOPs per real token and model FLOPs utilisation (MFU).

A dense matmul with a weight of N parameters costs 2N FLOPs per token forward. Training then costs,
per real (non-padding) token, with N = the model's non-embedding parameters:

    full fine-tuning        6 N   (2 forward + 2 gradient w.r.t. activations + 2 w.r.t. weights)
    frozen backbone (LoRA,  4 N   (2 forward + 2 w.r.t. activations; weight gradients only for the
      QLoRA, IA3)                  adapters, which are <1% of N and left out)

Attention's own score/value products (4 * layers * width * sequence length per token) are left out,
as in the usual "6N" convention, so MFU is slightly understated, never inflated. Only real tokens
count: padding is work, but not useful work. MFU = tokens/s * FLOPs per token / the device's dense
bf16 peak.
"""
from __future__ import annotations

import torch

# dense (not sparse) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets; first match wins
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),       # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """FLOP/s for a CUDA device name, or None when unknown (CPUs included)."""
    upper = device_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in upper:
            return tflops * 1e12
    return None


def non_embedding_params(model_name: str, num_labels: int = 2) -> int:
    """Parameters of the classifier outside its embedding tables, counted on the meta device (no
    weights are loaded or allocated)."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.models.loading import model_config

    config = model_config(model_name, [str(i) for i in range(num_labels)])
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    # the embedding tables (a decoder's embed_tokens too), and the rest of BERT's embeddings block
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and id(p) not in tables)


def flops_per_token(params: int, method: str) -> float:
    from peftlab.models.methods import registry

    return registry.get(method).flops_per_token(params)


def mfu(tokens_per_second: float | None, flops_token: float, peak: float | None) -> float | None:
    if not tokens_per_second or not peak:
        return None
    return tokens_per_second * flops_token / peak

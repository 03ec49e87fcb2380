"""LoRA (Hu et al. 2021) through peft: low-rank updates on chosen linear layers; the head trains in full."""
from peft import LoraConfig, TaskType, get_peft_model

from peftlab.models.architectures import check_targets, head_module_names, layers_pattern, resolve_targets
from peftlab.models.methods.registry import Method, register

HYPERPARAMETERS = ("r", "alpha", "dropout", "target_modules", "layers", "rank_pattern")


def lora_config(model, cfg) -> LoraConfig:
    targets = resolve_targets(model, cfg.target_modules, "lora_targets")
    check_targets(model, targets + list(cfg.rank_pattern), cfg.layers)
    return LoraConfig(
        task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=targets, layers_to_transform=cfg.layers, layers_pattern=layers_pattern(model) if cfg.layers else None,
        rank_pattern=dict(cfg.rank_pattern),
        # explicit, because the head is not always called "classifier" (peft #310, #1070)
        modules_to_save=head_module_names(model),
    )


def apply(model, cfg, device):
    return get_peft_model(model, lora_config(model, cfg))


register(Method(name="lora", summary="low-rank adapters on attention projections", default_learning_rate=1e-3, apply=apply,
                hyperparameters=HYPERPARAMETERS, adapter_kind="LoRA"))

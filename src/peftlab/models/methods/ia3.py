"""IA3 (Liu et al. 2022) through peft: learned vectors rescale keys, values and feed-forward outputs."""
import re

from peft import IA3Config, TaskType, get_peft_model

from peftlab.models.architectures import ARCHITECTURES, check_targets, head_module_names, layers_pattern, \
    resolve_targets
from peftlab.models.methods.registry import Method, register


def _only_layers(names: list[str], pattern: str, layers: list[int]) -> str:
    """IA3Config has no layers_to_transform: restrict to layers with a regex over full module names."""
    alternatives = "|".join(re.escape(n) for n in names) or "(?!)"
    return rf".*\.{re.escape(pattern)}\.({'|'.join(map(str, layers))})\..*({alternatives})$"


def apply(model, cfg, device):
    targets = resolve_targets(model, cfg.target_modules, "ia3_targets")
    check_targets(model, targets, cfg.layers)
    # IA3 scales a feed-forward layer's input rather than its output, so peft must know which those are
    # (by name or as the last part of one: mlp.down_proj, from all-linear, is a down_proj)
    known = ARCHITECTURES.get(model.config.model_type)
    feedforward = [t for t in targets if known and any(t == f or t.endswith("." + f) for f in known.ia3_feedforward)]
    if cfg.layers:
        pattern = layers_pattern(model)
        targets, feedforward = _only_layers(targets, pattern, cfg.layers), _only_layers(feedforward, pattern, cfg.layers)
    config = IA3Config(task_type=TaskType.SEQ_CLS, target_modules=targets, feedforward_modules=feedforward,
                       modules_to_save=head_module_names(model))
    return get_peft_model(model, config)


register(Method(name="ia3", summary="learned rescaling vectors (keys, values, feed-forward)", default_learning_rate=5e-3, apply=apply,
                hyperparameters=("target_modules", "layers"), adapter_kind="IA3"))

"""Full fine-tuning: every parameter trains; the whole model is saved."""
from peftlab.models.methods.registry import Method, register


def apply(model, cfg, device):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


register(Method(name="full", summary="all parameters train", default_learning_rate=5e-5,
                apply=apply, saves_adapter=False, trains_backbone=True))

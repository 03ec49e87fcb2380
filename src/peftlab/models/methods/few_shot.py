"""Few-shot methods (SetFit's recipe, Tunstall et al. 2022; docs/few-shot.md), trained by
peftlab.training.contrastive rather than the standard loop:

- contrastive-lora / contrastive-ia3 / contrastive-full: the body, through that body method, is tuned on
  sentence pairs drawn from the labelled rows (cosine similarity of the pooled embeddings towards 1 for
  a pair of one class, 0 otherwise); then the head is fitted on the labelled rows' embeddings.
- probe: the head alone, fitted on frozen pooled embeddings (a linear probe): the fastest baseline.

Their weights are their body method's (a LoRA or IA3 adapter with the head, or a whole model), so
predict, serve and export read them as they read any run's. The probe saves a LoRA adapter whose
update is exactly zero (B = 0) beside its head: a small file, and the adapter path everywhere."""
from peftlab.models.methods import full, ia3, lora  # noqa: F401  (registered before the variants built on them)
from peftlab.models.methods.registry import Method, get, register

TRAINER = "peftlab.training.contrastive:ContrastiveTrainer"
FEW_SHOT = ("pair_iterations", "body_epochs", "pair_objective", "pair_temperature", "end_to_end_epochs", "head_fit", "head_c")
# the body's learning rates for the pairs: full fine-tuning SetFit's 2e-5; adapters higher, as in their own runs
BODY_LEARNING_RATE = {"lora": 2e-4, "ia3": 3e-3, "full": 2e-5}


def _contrastive(body: str) -> Method:
    base = get(body)
    return Method(name=f"contrastive-{body}", summary=f"SetFit's recipe: sentence pairs tune a {body} body, then the head is fitted",
                  default_learning_rate=BODY_LEARNING_RATE[body], apply=base.apply, saves_adapter=base.saves_adapter,
                  trains_backbone=base.trains_backbone, hyperparameters=base.hyperparameters + FEW_SHOT,
                  adapter_kind=base.adapter_kind, trainer=TRAINER, pooled_head=True)


def _probe_apply(model, cfg, device):
    """A LoRA adapter that stays zero (frozen), so that the trained head saves and loads as any adapter run's."""
    model = get("lora").apply(model, cfg, device)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    return model


for _body in BODY_LEARNING_RATE:
    register(_contrastive(_body))
register(Method(name="probe", summary="the head alone, on frozen pooled embeddings (a linear probe)",
                default_learning_rate=1e-2, apply=_probe_apply, hyperparameters=("head_fit", "head_c"),
                trainer=TRAINER, pooled_head=True))

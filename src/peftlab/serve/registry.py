"""The runs a server holds, loaded and unloaded at any time, grouped so that adapters share a base.

A group is one model in memory. Runs with the same base model and adapter type (LoRA, or IA3: peft
holds several adapters of one type on a model, not a mix) are named adapters of one PeftModel, even when
their label sets differ: every adapter keeps its own classification head (peft's modules_to_save), and a
head narrower or wider than the group's is taken from a model built for that run's labels, and
single-label and multi-label runs mix (the head's logits are the same kind; each run's Predictor turns its
own into probabilities: softmax, or a sigmoid per label). Full fine-tuning runs are a group of their own.
"""
from __future__ import annotations

import itertools
import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftlab.errors import UserError
from peftlab.evaluation.predict import Predictor
from peftlab.models.loading import is_random, load_classifier, quiet_transformers
from peftlab.models.speed import linear_weights_to
from peftlab.runs.trained import completed_run, load_trained
from peftlab.runtime import Runtime


class AlreadyServed(UserError):
    """A run of that name is served already."""


@dataclass(eq=False)
class Group:
    """One model in memory: a base with named adapters, or a fully fine-tuned model."""
    key: tuple
    model: torch.nn.Module
    index: int
    mixable: bool  # LoRA: rows of several adapters can share a forward pass (peft's adapter_names)
    lock: threading.Lock = field(default_factory=threading.Lock)
    members: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Served:
    name: str
    run_dir: Path
    method: str
    base: str
    group: Group
    predictor: Predictor
    loaded: bool = True  # False once unloaded: requests still queued for it are refused

    @property
    def label_names(self) -> list[str]:
        return self.predictor.label_names

    def describe(self) -> dict:
        """The /adapters entry: what the run is, and the rule that turns its probabilities into answers."""
        p = self.predictor
        return {"name": self.name, "method": self.method, "base_model": self.base, "labels": self.label_names,
                "model_in_memory": self.group.index, **p.task.rule(p.label_names, p.threshold, p.temperature)}


def route_heads_per_row(model: torch.nn.Module) -> None:
    """In a mixed batch, send each row through its own adapter's head modules. peft 0.21's
    ModulesToSaveWrapper does honour adapter_names (peft #1960 is fixed), but only for Linear-like heads
    (not RoBERTa's ClassificationHead) and it stacks the rows' outputs, so heads of different widths
    (runs with different label counts) cannot share a batch. Here outputs are padded to the widest;
    predict_logits pads across batches and each run reads its own columns."""
    from peft.utils.other import ModulesToSaveWrapper

    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        plain = type(wrapper).forward

        def forward(x, *args, adapter_names=None, _wrapper=wrapper, _plain=plain, **kwargs):
            if adapter_names is None:
                return _plain(_wrapper, x, *args, **kwargs)
            outs = []
            for name in dict.fromkeys(adapter_names):
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                outs.append((rows, _wrapper.modules_to_save[name](x[rows], *args, **kwargs)))
            width = max(y.shape[-1] for _, y in outs)
            out = outs[0][1].new_zeros((len(adapter_names), *outs[0][1].shape[1:-1], width))
            for rows, y in outs:
                out[rows, ..., :y.shape[-1]] = y
            return out

        wrapper.forward = forward  # instance attribute: peft's hooks still pass adapter_names to it


def _check_weights(weights: Path) -> None:
    """Name a damaged weights file (truncated, overwritten) before loading: loaders name only the folder."""
    from safetensors import safe_open

    for file in sorted(weights.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):  # reads the header and checks it against the file's size
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise UserError(f"{file}: damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"retrain the run") from None


def _load_adapter(model, adapter: str, weights: Path, own=None) -> None:
    """One more adapter on a shared model; with `own` (the run loaded on a base built for its labels),
    its head modules are taken from there instead of the shared model's differently shaped ones."""
    from peft.utils.other import ModulesToSaveWrapper

    try:
        with warnings.catch_warnings():  # peft warns of the head it skips: replaced just below
            warnings.simplefilter("ignore")
            model.load_adapter(weights, adapter_name=adapter, ignore_mismatched_sizes=own is not None)
        if own is not None:
            for path, wrapper in model.named_modules():
                if isinstance(wrapper, ModulesToSaveWrapper):
                    wrapper.modules_to_save[adapter] = own.get_submodule(path).modules_to_save[adapter]
    except Exception:
        if adapter in model.peft_config:  # a half-loaded adapter must not stay behind
            model.delete_adapter(adapter)
        raise


class Registry:
    """Served runs by name. add() and remove() may run while requests are served: model changes
    happen under the group's lock, the dictionaries under the registry's."""

    def __init__(self, device: torch.device, on_group_added=None, on_group_removed=None, precision: str = "auto"):
        # auto: bf16 where the device multiplies bf16 in hardware (runtime.auto_precision), else fp32
        self.device, self.runtime = device, Runtime.pick(device, precision)
        self.served: dict[str, Served] = {}
        self.groups: dict[tuple, Group] = {}
        self.lock = threading.RLock()
        self._ids = itertools.count()  # peft adapter names are never reused, so a reload is a fresh adapter
        self._group_ids = itertools.count()
        self.on_group_added, self.on_group_removed = on_group_added, on_group_removed

    def add(self, run_dir: str | Path) -> Served:
        """Load a completed run; UserError (one line, naming the file) for anything wrong with it."""
        if "\0" in str(run_dir):
            raise UserError("run directory path contains a NUL character")
        with self.lock:
            run, record, cfg = completed_run(run_dir)
            name = run.path.resolve().name
            if name in self.served:
                raise AlreadyServed(f"a run named {name!r} is already served ({self.served[name].run_dir}): "
                                f"serve runs whose directory names differ, or unload it first")
            weights = run.saved_weights()
            _check_weights(weights)
            if weights.name == "model":  # full fine-tuning: a model of its own
                trained = load_trained(run.path, self.device)
                group = self._new_group(("full", name), trained.model, mixable=False)
                predictor = trained.predictor(self.runtime)
            else:
                group, predictor = self._add_adapter(run, record, cfg, weights)
            served = Served(name, run.path, cfg.method.name, cfg.model.name, group, predictor)
            group.members.add(name)
            self.served[name] = served
            return served

    def _add_adapter(self, run, record, cfg, weights: Path) -> tuple[Group, Predictor]:
        from peft import PeftModel
        from transformers import AutoTokenizer

        if is_random(cfg.model.name):
            raise UserError(f"run {str(run.path)!r} used random weights ({cfg.model.name}): it is for speed "
                            f"measurements only and cannot be served")
        # peft adapter names must be valid module attribute names; served names are free text
        adapter = f"adapter{next(self._ids)}"
        labels = record.label_names
        quiet_transformers()
        try:
            tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=False)
            peft_type = json.loads((weights / "adapter_config.json").read_text())["peft_type"]
            # runs whose heads read different things cannot share a base (the pooled head is the base's)
            key = (cfg.model.name, peft_type, json.dumps(record.head, sort_keys=True))
            group = self.groups.get(key)
            if group is None:
                base = load_classifier(cfg.model.name, labels, task=record.kind, head=record.head,
                                       pad_token_id=tokenizer.pad_token_id,
                                       trust_remote_code=cfg.model.trust_remote_code)
                model = PeftModel.from_pretrained(base, weights, adapter_name=adapter)
                if peft_type == "LORA":
                    route_heads_per_row(model)
                model = model.to(self.device).eval()
                linear_weights_to(model, self.runtime.dtype)  # the same outputs under autocast, no re-cast per batch
                group = self._new_group(key, model, mixable=peft_type == "LORA")
            else:
                # a head of another width (other label count) comes from a model built for this run's labels:
                # a temporary second copy of the base, at load time only, outside the lock
                own = None if len(labels) == group.model.config.num_labels else PeftModel.from_pretrained(
                    load_classifier(cfg.model.name, labels, head=record.head, pad_token_id=tokenizer.pad_token_id,
                                    trust_remote_code=cfg.model.trust_remote_code),
                    weights, adapter_name=adapter)
                with group.lock:
                    _load_adapter(group.model, adapter, weights, own)
                    group.model.to(self.device)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated safetensors, bad JSON, ... come in many types
            raise UserError(f"run {str(run.path)!r}: its weights in {weights} cannot be loaded "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); retrain the run") from None
        predictor = Predictor(group.model, tokenizer, labels, cfg.data.max_length, self.runtime, adapter=adapter,
                              lock=group.lock, merge_lora=False, temperature=record.temperature,
                              threshold=record.threshold, task=record.kind)
        return group, predictor

    def _new_group(self, key: tuple, model: torch.nn.Module, mixable: bool) -> Group:
        group = self.groups[key] = Group(key, model, next(self._group_ids), mixable)
        if self.on_group_added:
            self.on_group_added(group)
        return group

    def remove(self, name: str) -> Served:
        """Unload a served run; KeyError when none has that name. Its base stays while other runs use it."""
        with self.lock:
            served = self.served.pop(name)
            group = served.group
            with group.lock:
                served.loaded = False
                group.members.discard(name)
                if group.members and served.predictor.adapter is not None:
                    with warnings.catch_warnings():  # peft notes that another adapter becomes the active one
                        warnings.simplefilter("ignore")
                        group.model.delete_adapter(served.predictor.adapter)
            if not group.members:
                del self.groups[group.key]
                if self.on_group_removed:
                    self.on_group_removed(group)
            return served

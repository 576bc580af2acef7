"""One backbone factory: ``timm.create_model`` plus where its starting weights come from.

Weights come from timm's hub (``pretrained: true``), from a local ``.safetensors``/``.pth`` file
read offline through timm's own ``pretrained_cfg_overlay=dict(file=...)`` (so timm still drops a
mismatched classifier and adapts the stem to ``in_chans``), or from an earlier medvision run
(``init_from``), which is the "pretrain on a large medical set, then fine-tune" step.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from medvision.errors import MedvisionError
from medvision.models.heads import classifier_keys
from medvision.recipe import ModelConfig

log = logging.getLogger("medvision")


class PretrainedUnavailable(MedvisionError, RuntimeError):
    """ImageNet weights were asked for but cannot be reached (offline, or a missing file)."""


def create_backbone(cfg: ModelConfig, num_classes: int, in_chans: int) -> nn.Module:
    """Creates the timm model with a fresh ``num_classes`` head and the configured starting weights.

    Examples:
        >>> create_backbone(ModelConfig(name="resnet18"), num_classes=2, in_chans=1)
    """
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate)
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if not timm.is_model(cfg.name.split(".")[0]):
        close = timm.list_models(f"*{cfg.name.split('.')[0][:6]}*")[:8]
        raise ValueError(f"model.name {cfg.name!r} is not a timm model; similar names: {close}")
    if isinstance(cfg.pretrained, str):
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise PretrainedUnavailable(f"model.pretrained: weights file {str(path)!r} does not exist")
        log.info("loading pretrained weights from %s", path)
        model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        return init_new_head(model)
    if cfg.pretrained:
        host = weights_host(cfg.name)
        if not reachable(host):
            raise PretrainedUnavailable(
                f"ImageNet weights for {cfg.name!r} are on {host}, which this machine cannot reach. "
                "Download the file elsewhere and set model.pretrained to its path to work offline."
            )
        try:
            return init_new_head(timm.create_model(cfg.name, pretrained=True, **kwargs))
        except Exception as err:  # hub errors come from requests, urllib, huggingface_hub, OSError ...
            raise PretrainedUnavailable(
                f"could not download ImageNet weights for {cfg.name!r} from the hub "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                "If this machine is offline, download the file elsewhere and set model.pretrained to its path."
            ) from err
    model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.init_from and load_run_weights(model, cfg.init_from):
        init_new_head(model)
    return model


def init_new_head(model: nn.Module) -> nn.Module:
    """Re-initialises the fresh classifier with small weights (std 0.01, zero bias).

    timm sizes some heads' init for 1000 classes; on pretrained features such a head starts with
    large logits, and the first steps of fine-tuning are spent undoing them.
    """
    head = cast(Any, model).get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return model


def weights_host(name: str) -> str:
    """The host timm would download ``name``'s default pretrained weights from."""
    pcfg = timm.models.get_pretrained_cfg(name.split(".")[0] if "." not in name else name)
    if pcfg is not None and pcfg.hf_hub_id:
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    if pcfg is not None and pcfg.url:
        return urlparse(str(pcfg.url)).hostname or "huggingface.co"
    return "huggingface.co"


def reachable(host: str, timeout: float = 3.0) -> bool:
    """A fast check before a hub download: the hub clients retry for about a minute when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def run_weights_path(source: str | Path) -> Path:
    """The weights file of a run folder (``model.safetensors``) or a checkpoint path itself."""
    source = Path(source)
    if source.is_dir():
        source = source / "model.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"no medvision weights at {str(source)!r}; expected a run folder or .safetensors")
    return source


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Reads model weights from safetensors, or from a torch file with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def load_run_weights(model: nn.Module, source: str | Path) -> list[str]:
    """Loads an earlier run's weights; head tensors whose shape differs are left freshly initialised.

    Returns the names of the re-initialised tensors (and logs them), so a 8-class BloodMNIST model
    can seed a 2-class task. A stem made for other input channels (a greyscale SimCLR backbone seeding an
    RGB task) is adapted by timm's ``adapt_input_conv``, as timm adapts ImageNet weights; any other tensor whose
    shape differs is an error: the backbone would be partly random.
    """
    path = run_weights_path(source)
    state = load_state(path)
    own = model.state_dict()
    cfg = cast(Any, model).pretrained_cfg
    head_name = cfg.get("classifier") or "classifier"
    head_keys = classifier_keys(model)
    if not head_keys:  # a headless model (pretraining) takes a fine-tuned run's backbone only
        state = {k: v for k, v in state.items() if not k.startswith(head_name + ".")}
    stem = f"{cfg.get('first_conv') or ''}.weight"
    reinit, wrong = [], []
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        change = f"{key} {tuple(value.shape)} -> {tuple(own[key].shape)}"
        if key in head_keys:
            reinit.append(change)
            del state[key]
        elif key == stem and value.ndim == 4 and value.shape[0] == own[key].shape[0] \
                and value.shape[2:] == own[key].shape[2:]:  # fmt: skip
            state[key] = timm.models.adapt_input_conv(own[key].shape[1], value)
            log.info("stem adapted from %d to %d input channel(s) (timm's adapt_input_conv): %s", value.shape[1],
                     own[key].shape[1], key)  # fmt: skip
        else:
            wrong.append(change)
    if wrong:
        raise ValueError(f"{path}: weights of another architecture, not only another head: {'; '.join(wrong[:5])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = classifier_keys(model)
    source_keys = set(state) | {r.split(" ")[0] for r in reinit}
    headless = sorted(head) if head and not head & source_keys else []  # a self-supervised backbone has no classifier
    if headless:
        reinit.append(f"{', '.join(headless)} (the source has no classifier)")
    unexplained = [k for k in missing if not any(r.startswith(k + " ") for r in reinit) and k not in headless]
    if unexplained or unexpected:
        raise ValueError(f"{path}: weights do not fit model; missing {unexplained[:5]}, unexpected {unexpected[:5]}")
    log.info("initialised from %s", path)
    if reinit:
        log.info("head re-initialised: %s", "; ".join(reinit))
    return reinit


def data_config(model: nn.Module, in_chans: int) -> dict[str, tuple[float, ...]]:
    """timm's mean/std for the model, averaged to one value for single-channel input."""
    cfg = timm.data.resolve_model_data_config(model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if in_chans != len(mean):
        mean = (sum(mean) / len(mean),) * in_chans
        std = (sum(std) / len(std),) * in_chans
    return {"mean": mean, "std": std}

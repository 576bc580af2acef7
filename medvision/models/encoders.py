"""Frozen patch encoders for pathology: a registry of foundation models, loaded from local checkpoints.

Each :class:`EncoderSpec` holds what it takes to reproduce a model's published embedding: the exact
construction keyword arguments, the input size and resize, the normalisation, how the embedding is
formed from the network's output (pooled, the CLS token, or CLS ⊕ mean of the patch tokens) and its
width, and the magnification the model was trained at. The figures come from each model's card and
loader code (cited per entry; the same values as the reference pipeline TRIDENT, mahmoodlab/TRIDENT,
``trident/patch_encoder_models/load.py``).

Weights are gated on the Hugging Face hub and a run here has no network, so a checkpoint is a local
file (or, for transformers models, a folder with ``config.json``): given directly, or through the
entry's environment variable (``MEDVISION_ENCODER_UNI=/models/uni/pytorch_model.bin``). ``hub`` keeps
the real download path (``timm.create_model("hf-hub:...", pretrained=True)``, which needs a token with
access). Any timm model with local weights works too: ``timm:<name>`` (e.g.
``timm:tf_efficientnet_lite0`` with ``../shared/weights/tf_efficientnet_lite0.in1k.safetensors``).

:func:`load_encoder` returns a :class:`PatchEncoder`: uint8 RGB tiles (B, 3, H, W) in, float32
embeddings (B, dim) out, with the resize and normalisation inside, so every caller preprocesses alike.
:meth:`PatchEncoder.embed` takes tile batches as the slide readers stack them, (B, H, W, 3).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from medvision.errors import MedvisionError
from medvision.io.files import sha256
from medvision.models.backbone import load_state
from medvision.models.heads import feature_width
from medvision.runtime import autocast

Pooling = Literal["pooled", "cls", "cls+mean"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(MedvisionError, ValueError):
    """An unknown encoder, a missing or mismatched checkpoint, or a missing optional library."""


@dataclass(frozen=True)
class EncoderSpec:
    """One patch encoder: how to build it, feed it and read its embedding."""

    name: str
    architecture: str
    """timm model name (``library: timm``) or ``transformers`` AutoModel (read from the checkpoint folder)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Exact construction keyword arguments, as the model card gives them."""
    input_size: int = 224
    resize: int | None = None
    """Resize the shorter side to this, then centre-crop ``input_size``, as the card's transform does even for a tile
    that already has the input size (Prov-GigaPath: 224 -> 256 -> 224); None: resize straight to ``input_size``."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dim: int = 0
    pooling: Pooling = "pooled"
    """``pooled``: the model's own pooled output; ``cls``: token 0; ``cls+mean``: token 0 ⊕ the mean of
    the patch tokens (after ``prefix_tokens`` class and register tokens)."""
    prefix_tokens: int = 1
    mpp: float | None = 0.5
    """Microns per pixel the model was trained at (0.5 is 20x); tile the slide at this MPP."""
    tile_size: int = 224
    """Tile side at ``mpp`` that the reference pipelines feed it (resized to ``input_size`` here)."""
    library: Literal["timm", "transformers"] = "timm"
    hub: str = ""
    """Hub id for the download path (``checkpoint="hub"``)."""
    source: str = ""
    """Model card: where the figures above come from."""

    @property
    def env(self) -> str:
        """The environment variable that points at a local checkpoint of this encoder."""
        return "MEDVISION_ENCODER_" + "".join(c if c.isalnum() else "_" for c in self.name.upper())


def _swiglu() -> dict[str, Any]:
    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


#: Built lazily so that importing this module does not touch timm's layers.
_ENTRIES: dict[str, Callable[[], EncoderSpec]] = {
    # https://huggingface.co/MahmoodLab/UNI (model card, "Model Usage"): ViT-L/16, 1024-d CLS token
    "uni": lambda: EncoderSpec(
        "uni", "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        resize=224, dim=1024, pooling="pooled", tile_size=256, hub="hf-hub:MahmoodLab/uni",
        source="https://huggingface.co/MahmoodLab/UNI"),
    # https://huggingface.co/MahmoodLab/UNI2-h (model card): ViT-H/14-style, 8 register tokens, SwiGLU, 1536-d
    "uni2-h": lambda: EncoderSpec(
        "uni2-h", "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
         "dynamic_img_size": True, **_swiglu()},
        resize=224, dim=1536, pooling="pooled", tile_size=256, hub="hf-hub:MahmoodLab/UNI2-h",
        source="https://huggingface.co/MahmoodLab/UNI2-h"),
    # https://huggingface.co/paige-ai/Virchow2 (model card): ViT-H/14, 4 register tokens, SwiGLU;
    # embedding = CLS ⊕ mean of the 256 patch tokens (tokens 5:), 2560-d; bicubic resize to 224
    "virchow2": lambda: EncoderSpec(
        "virchow2", "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
         "global_pool": "", "dynamic_img_size": True, **_swiglu()},
        interpolation="bicubic", dim=2560, pooling="cls+mean", prefix_tokens=5, tile_size=224,
        hub="hf-hub:paige-ai/Virchow2", source="https://huggingface.co/paige-ai/Virchow2"),
    # https://huggingface.co/bioptimus/H-optimus-0 (model card): ViT-g/14 with 4 registers, 1536-d, its own mean/std
    "h-optimus-0": lambda: EncoderSpec(
        "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
        {"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), dim=1536, pooling="pooled",
        tile_size=224, hub="hf-hub:bioptimus/H-optimus-0", source="https://huggingface.co/bioptimus/H-optimus-0"),
    # https://huggingface.co/prov-gigapath/prov-gigapath (model card; prov-gigapath demo/3_load_tile_encoder.py):
    # ViT-g/16 (DINOv2 layout), 1536-d; resize 256 bicubic, centre crop 224
    "prov-gigapath": lambda: EncoderSpec(
        "prov-gigapath", "vit_giant_patch14_dinov2",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True},
        resize=256, interpolation="bicubic", dim=1536, pooling="pooled", tile_size=256,
        hub="hf_hub:prov-gigapath/prov-gigapath", source="https://huggingface.co/prov-gigapath/prov-gigapath"),
    # https://huggingface.co/owkin/phikon-v2 (model card): a DINOv2 ViT-L/16 in transformers; CLS of the last
    # hidden state, 1024-d; the checkpoint is the card's folder (config.json + model.safetensors)
    "phikon-v2": lambda: EncoderSpec(
        "phikon-v2", "transformers", {}, resize=224, dim=1024, pooling="cls", tile_size=224, library="transformers",
        hub="owkin/phikon-v2", source="https://huggingface.co/owkin/phikon-v2"),
}  # fmt: skip
ENCODERS = tuple(_ENTRIES)


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry ``name``, or for ``timm:<model>`` an entry read from timm's own config.

    A ``timm:`` entry takes timm's mean, std, input size and interpolation but not its ``crop_pct`` (timm's eval
    transform for tf_efficientnet_lite0: resize 256, centre crop 224): a tile is already cut at the target MPP
    with the model's input size, so that crop would zoom it by ``1 / crop_pct`` and drop its edge (23% of the
    area at 0.875), tissue its coords say it holds. The tile is resized straight to the input size (a no-op at
    the default tile size). Registry entries follow their own cards' transforms (``resize``).

    Examples:
        >>> encoder_spec("uni").dim
        1024
    """
    if name in _ENTRIES:
        return _ENTRIES[name]()
    if name.startswith("timm:"):
        arch = name[len("timm:") :]
        if not timm.is_model(arch):
            raise EncoderError(f"encoder {name!r}: timm has no model {arch!r}")
        cfg = timm.get_pretrained_cfg(arch)
        size = int(cfg.input_size[-1]) if cfg is not None else 224
        mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
        std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
        bicubic = cfg is not None and cfg.interpolation == "bicubic"
        interpolation: Literal["bilinear", "bicubic"] = "bicubic" if bicubic else "bilinear"
        hub = f"hf-hub:{cfg.hf_hub_id}" if cfg is not None and cfg.hf_hub_id else ""
        return EncoderSpec(name, arch, {"num_classes": 0}, input_size=size, mean=mean, std=std,  # type: ignore[arg-type]
                           interpolation=interpolation, pooling="pooled", mpp=None, tile_size=size, hub=hub,
                           source=f"timm {arch}")  # fmt: skip
    raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}, or timm:<model name>")


def resolve_checkpoint(spec: EncoderSpec, checkpoint: str | Path | None) -> str | Path:
    """The checkpoint to load: the one given, else the entry's environment variable; ``hub`` downloads."""
    given = checkpoint if checkpoint is not None else os.environ.get(spec.env)
    if given is None or str(given) == "":
        raise EncoderError(
            f"encoder {spec.name!r} needs its weights: pass a local checkpoint or set {spec.env}=/path/to/"
            f"{'folder' if spec.library == 'transformers' else 'weights'} (download it, with access granted, from "
            f"{spec.source or spec.hub}); 'hub' downloads it where the hub is reachable"
        )
    if str(given) == "hub":
        return "hub"
    path = Path(given).expanduser()
    if not path.exists():
        raise EncoderError(f"encoder {spec.name!r}: checkpoint {path} does not exist")
    return path


#: The weights of a checkpoint folder (a hub snapshot or a transformers folder), in the order transformers'
#: ``from_pretrained`` looks for them: safetensors (one file, then sharded), then a torch file (one, then sharded).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip


def weight_files(folder: Path) -> list[Path]:
    """The files that hold a checkpoint folder's weights, the first of :data:`WEIGHT_FILES` the folder has (the one
    the loader reads): one file, or every shard its index names (sorted)."""
    for name in WEIGHT_FILES:
        if not (folder / name).is_file():
            continue
        if not name.endswith(".index.json"):
            return [folder / name]
        try:
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise EncoderError(f"{folder / name}: not a weight index ({type(err).__name__}: {err}); expected "
                               '{"weight_map": {parameter: shard file}}') from None  # fmt: skip
        return [folder / s for s in shards]
    return []


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint, recorded with every feature file: of the file, or for a folder of its weights
    (:func:`weight_files`; the shards one after another), so a folder's hash is its single weight file's.

    Raises:
        EncoderError: a folder without weights, or a shard its index names that is missing.
    """
    p = Path(path)
    files = weight_files(p) if p.is_dir() else [p]
    if not files:
        raise EncoderError(f"{p}: no weights in the folder (expected {', '.join(WEIGHT_FILES)})")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise EncoderError(f"{missing[0]}: weight shard named by {p}'s index is missing")
    return sha256(*files)


def hub_sha256(spec: EncoderSpec) -> str:
    """SHA-256 of the weights a ``hub`` load read, from the hub's local cache (the snapshot it resolved): the same
    hash as a local copy of that file, so features embedded either way are known to share one feature space.
    ``hub:<repo>`` when the cache does not hold them (a custom cache the loader was pointed at)."""
    from huggingface_hub import try_to_load_from_cache

    # timm's prefix, in either spelling the cards use (Prov-GigaPath's hf_hub:); transformers entries have none
    repo = spec.hub.removeprefix("hf-hub:").removeprefix("hf_hub:")
    try:
        found = try_to_load_from_cache(repo, "config.json") if repo else None
    except ValueError:  # not a hub repository id
        found = None
    if isinstance(found, str) and weight_files(Path(found).parent):
        return checkpoint_sha256(Path(found).parent)
    return f"hub:{repo or spec.architecture}"


def _fix(spec: EncoderSpec) -> str:
    """What to do about a checkpoint that cannot be loaded: where the weights come from and how to point at them."""
    what = "folder (config.json and the weights)" if spec.library == "transformers" else "weights file"
    where = spec.source if spec.source.startswith("https://") else spec.hub or spec.source
    return (
        f"download the {what} from {where} and set {spec.env}=PATH or pass --checkpoint PATH "
        "(features) / --encoder-checkpoint PATH (score)"
    )


def _hub_error(spec: EncoderSpec, err: Exception) -> EncoderError:
    return EncoderError(f"encoder {spec.name!r}: the hub download of {spec.hub or spec.architecture} failed "
                        f"({type(err).__name__}: {_first_line(err)}); offline, {_fix(spec)}")  # fmt: skip


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _transformers_network(spec: EncoderSpec, checkpoint: str | Path) -> nn.Module:
    """A transformers encoder from its folder (or the hub), strictly: a key the checkpoint lacks, has over, or holds
    in another shape is an error, where ``from_pretrained`` would fill it with random values and only log it."""
    try:
        from transformers import AutoModel
    except ModuleNotFoundError:
        raise EncoderError(f"encoder {spec.name!r} needs transformers: pip install 'medvision[pathology]'") from None
    where = spec.hub if checkpoint == "hub" else str(checkpoint)
    if checkpoint != "hub" and not (Path(where) / "config.json").is_file():
        raise EncoderError(f"encoder {spec.name!r}: {where} must be a folder with config.json and the weights "
                           f"(as on {spec.source})")  # fmt: skip
    try:
        model, info = AutoModel.from_pretrained(where, output_loading_info=True)
    except Exception as err:  # OSError (offline, no weights), SafetensorError (truncated), ValueError (bad config)
        if checkpoint == "hub":
            raise _hub_error(spec, err) from None
        raise EncoderError(f"encoder {spec.name!r}: {where} cannot be loaded ({type(err).__name__}: "
                           f"{_first_line(err)}); {_fix(spec)}") from None  # fmt: skip
    bad = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        found = "; ".join(f"{len(v)} {k.replace('_', ' ')} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                          for k, v in bad.items() if v)  # fmt: skip
        raise EncoderError(f"encoder {spec.name!r}: the weights in {where} do not fit its {type(model).__name__} "
                           f"(config.json): {found}; expected every parameter, as on {spec.source}")  # fmt: skip
    return model.eval()


def build_network(spec: EncoderSpec, checkpoint: str | Path) -> nn.Module:
    """The encoder's network with its weights: from a local file (strictly, every key) or from the hub.

    Raises:
        EncoderError: a checkpoint that cannot be read or does not fit, or a hub download that failed, naming the
            encoder, the path and the fix.
    """
    if spec.library == "transformers":
        return _transformers_network(spec, checkpoint)
    if checkpoint == "hub":
        try:
            return timm.create_model(spec.hub or spec.architecture, pretrained=True, **spec.kwargs).eval()
        except OSError as err:  # offline, gated, not in the cache: huggingface_hub's errors are OSErrors
            raise _hub_error(spec, err) from None
    path = Path(checkpoint)
    if path.is_dir():
        inside = weight_files(path)
        hint = f" (the weights in it: {inside[0]})" if len(inside) == 1 else ""
        raise EncoderError(f"encoder {spec.name!r}: checkpoint {path} is a folder{hint}; a timm encoder takes its "
                           f"weights file: {_fix(spec)}")  # fmt: skip
    model = timm.create_model(spec.architecture, pretrained=False, **spec.kwargs)
    try:
        state = load_state(path)
    except Exception as err:  # SafetensorError (truncated), pickle's and torch's errors: not a weights file
        raise EncoderError(f"encoder {spec.name!r}: {path} cannot be read as weights ({type(err).__name__}: "
                           f"{_first_line(err)}); cut short, or not a checkpoint: {_fix(spec)}") from None  # fmt: skip
    if not isinstance(state, dict):
        raise EncoderError(f"encoder {spec.name!r}: {path} holds a {type(state).__name__}, not a state dict of "
                           f"tensors; {_fix(spec)}")  # fmt: skip
    if spec.name.startswith("timm:"):  # a classifier's checkpoint: its head is not part of the encoder
        heads: Any = timm.get_pretrained_cfg_value(spec.architecture, "classifier") or "head"
        prefixes = tuple(f"{h}." for h in ([heads] if isinstance(heads, str) else heads))
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise EncoderError(f"encoder {spec.name!r}: {checkpoint} does not fit {spec.architecture} built as its "
                           f"card says: {' '.join(first)}") from None  # fmt: skip
    return model.eval()


class PatchEncoder(nn.Module):
    """uint8 RGB tiles (B, 3, H, W) -> embeddings (B, dim) float32, preprocessing inside.

    Resize (shorter side to ``resize`` then centre crop, or straight to ``input_size``; antialiased, as
    torchvision's ``Resize`` on tensors), scale to [0, 1], normalise, run the network, pool as the card says.
    """

    def __init__(self, spec: EncoderSpec, network: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.network = network
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-1 float) tiles (B, 3, H, W) -> the network's input: resized as the card says, normalised,
        and channels-last in memory, the layout CPU convolutions run fastest on (tf_efficientnet_lite0 here: 1.5x
        in bf16, 1.6x in float32 against the same batch in NCHW memory; ViTs unchanged)."""
        x = tiles.float() / 255.0 if tiles.dtype == torch.uint8 else tiles.float()
        size, resize = self.spec.input_size, self.spec.resize
        h, w = x.shape[-2:]
        if resize is not None:  # torchvision's Resize(resize) then CenterCrop(size), as the cards compose them
            if min(h, w) != resize:
                short, long = (h, w) if h <= w else (w, h)
                long = int(resize * long / short)  # Resize truncates the longer side
                x = F.interpolate(x, size=(resize, long) if h <= w else (long, resize), mode=self.spec.interpolation,
                                  antialias=True, align_corners=False)  # fmt: skip
            top, left = round((x.shape[-2] - size) / 2), round((x.shape[-1] - size) / 2)  # CenterCrop rounds
            x = x[..., top : top + size, left : left + size]
        elif (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode=self.spec.interpolation, antialias=True, align_corners=False)
        return ((x.clamp(0.0, 1.0) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(tiles)
        if self.spec.library == "transformers":
            tokens = self.network(pixel_values=x).last_hidden_state
            return tokens[:, 0].float()
        out = self.network(x)
        if self.spec.pooling == "pooled":
            return out.float()
        if self.spec.pooling == "cls":
            return out[:, 0].float()
        return torch.cat([out[:, 0], out[:, self.spec.prefix_tokens :].mean(1)], dim=-1).float()

    @property
    def dim(self) -> int:
        return self.spec.dim

    def embed(self, batches: Iterable[Any], device: torch.device, amp: str = "none") -> np.ndarray:
        """Embeddings of uint8 tile batches (B, H, W, 3), as the readers stack them, on ``device`` in ``amp``
        (``none``: float32), as float32 (N, dim): the one path by which ``features`` and ``score`` embed tiles.

        A batch goes to the network as a (B, 3, H, W) view of its (B, H, W, 3) memory, i.e. channels-last,
        the layout :meth:`preprocess` hands on: no transpose in the readers or here (0.13 ms a 224 px tile on
        the CPU, and on the reader's core in ``features``).

        On a GPU, up to :data:`IN_FLIGHT` batches are queued before the oldest one's embeddings are waited for
        (copied back into pinned memory behind its forward pass, an event marks them ready): the next batch is
        taken from the readers and copied while the GPU computes, where waiting for each batch's embeddings
        before asking for the next one left the GPU idle for that time. On the CPU a forward pass ends with its
        result: the queue changes nothing there but the moment a result is appended."""
        out: list[np.ndarray] = []
        pending: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        with torch.inference_mode(), autocast(device, amp):
            for batch in batches:
                x = torch.as_tensor(batch)
                if x.ndim != 4 or x.shape[-1] != 3:
                    raise ValueError(f"tile batch of shape {tuple(x.shape)}: expected uint8 (B, H, W, 3)")
                x = (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)
                pending.append(_to_host(self(x.permute(0, 3, 1, 2)).float()))
                while len(pending) > IN_FLIGHT:
                    out.append(_ready(*pending.popleft()))
            out += [_ready(*p) for p in pending]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


#: Batches a GPU may have queued before :meth:`PatchEncoder.embed` waits for the oldest one's embeddings.
IN_FLIGHT = 2


def _to_host(y: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``y`` on its way to the host: a CUDA tensor is copied into pinned memory behind the work queued before it
    (``non_blocking``), with the event that marks the copy done; a CPU tensor is there already."""
    if y.device.type != "cuda":
        return y, None
    host = y.to("cpu", non_blocking=True)  # pinned by PyTorch for a non-blocking copy from CUDA
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(y.device))  # y's GPU, whichever is the process's current one
    return host, done


def _ready(y: torch.Tensor, done: torch.cuda.Event | None) -> np.ndarray:
    """The embeddings :func:`_to_host` sent, once there (a copy: the pinned block goes back to PyTorch's cache)."""
    if done is None:
        return y.numpy()
    done.synchronize()
    return y.numpy().copy()


def load_encoder(name: str, checkpoint: str | Path | None = None) -> tuple[PatchEncoder, str]:
    """The frozen encoder ``name`` in eval mode, and its checkpoint's SHA-256 (for a download, of the file the hub
    cache holds: :func:`hub_sha256`).

    Examples:
        >>> encoder, sha = load_encoder("uni", "/models/uni/pytorch_model.bin")
        >>> encoder(torch.zeros(2, 3, 256, 256, dtype=torch.uint8)).shape
        torch.Size([2, 1024])
    """
    spec = encoder_spec(name)
    where = resolve_checkpoint(spec, checkpoint)
    network = build_network(spec, where)
    if spec.dim == 0:  # timm:<model>: the width is the network's
        spec = replace(spec, dim=feature_width(network))
    encoder = PatchEncoder(spec, network).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    check_width(encoder, where)
    return encoder, hub_sha256(spec) if where == "hub" else checkpoint_sha256(where)


def check_width(encoder: PatchEncoder, checkpoint: str | Path) -> None:
    """One tile through the encoder: its embedding must have the entry's width, or every feature file would say
    ``dim`` while holding another (a folder of another ViT loads as any transformers entry).

    Raises:
        EncoderError: naming the encoder, the checkpoint and both widths.
    """
    spec = encoder.spec
    with torch.inference_mode():
        out = encoder(torch.zeros(1, 3, spec.tile_size, spec.tile_size, dtype=torch.uint8))
    if tuple(out.shape) != (1, spec.dim):
        raise EncoderError(f"encoder {spec.name!r}: {checkpoint} gives embeddings of shape {tuple(out.shape)[1:]}, "
                           f"expected ({spec.dim},) as its card says: these are another model's weights; "
                           f"{_fix(spec)}")  # fmt: skip

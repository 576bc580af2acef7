"""albumentations pipelines from the recipe, and the two presets.

Images enter as float32 in [0, 1] (see :mod:`medvision.io.image`), so 16-bit detail survives
augmentation; ``Normalize`` then uses the backbone's own mean and std from timm's data config.
Evaluation always uses resize + normalise only.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Annotated, Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.pydantic import check_range_bounds, nondecreasing
from albumentations.core.transforms_interface import BaseTransformInitSchema
from albumentations.pytorch import ToTensorV2
from pydantic import AfterValidator

from medvision.recipe import AugmentConfig, RecipeError
from medvision.wsi.stain import hed_jitter


class HEDJitter(A.ImageOnlyTransform):
    """HED stain jitter (Tellez et al.): hematoxylin and eosin each scaled and shifted in OD, the residual kept.

    The maths is :func:`medvision.wsi.stain.hed_jitter`; this draws its parameters from albumentations' random
    state, so ``Compose.set_random_seed`` (the sampler's per-sample seed) makes a run's augmentation
    reproducible. It replaces ``A.HEStain(method="preset", preset="ruifrok")``, whose two-stain reconstruction
    puts a blue cast even on an identity draw (see :mod:`medvision.wsi.stain`); the arguments mean the same and
    are drawn in the same order (scale H, scale E, shift H, shift E).

    Args:
        intensity_scale_range: each stain's concentration is multiplied by a draw from this range.
        intensity_shift_range: and then shifted by a draw from this one (OD along the unit stain vector).
        p: probability of applying the jitter.

    Examples:
        >>> pipeline = A.Compose([HEDJitter((0.9, 1.1), (-0.05, 0.05), p=0.5)])
        >>> out = pipeline(image=np.full((8, 8, 3), 0.5, np.float32))["image"]
    """

    class InitSchema(BaseTransformInitSchema):
        intensity_scale_range: Annotated[
            tuple[float, float], AfterValidator(nondecreasing), AfterValidator(check_range_bounds(0, None))
        ]
        intensity_shift_range: Annotated[
            tuple[float, float], AfterValidator(nondecreasing), AfterValidator(check_range_bounds(-1, 1))
        ]

    def __init__(
        self,
        intensity_scale_range: tuple[float, float] = (0.9, 1.1),
        intensity_shift_range: tuple[float, float] = (-0.05, 0.05),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.intensity_scale_range = intensity_scale_range
        self.intensity_shift_range = intensity_shift_range

    def get_params(self) -> dict[str, Any]:
        uniform, scale, shift = self.py_random.uniform, self.intensity_scale_range, self.intensity_shift_range
        return {"scale": (uniform(*scale), uniform(*scale)), "shift": (uniform(*shift), uniform(*shift))}

    def apply(
        self, img: np.ndarray, scale: tuple[float, float], shift: tuple[float, float], **params: Any
    ) -> np.ndarray:
        return hed_jitter(img, scale, shift)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("intensity_scale_range", "intensity_shift_range")


#: medvision's own transforms, which ``augment.transforms`` may name beside albumentations' classes.
OWN_TRANSFORMS: dict[str, type[A.BasicTransform]] = {"HEDJitter": HEDJitter}


def tissue_invariances(stain_scale: float, stain_shift: float) -> list[A.BasicTransform]:
    """What H&E tissue is invariant to: flips, rot90 (tissue has no up), and HED stain jitter (scanner and stain
    batches) scaling each stain by up to ``1 ± stain_scale`` and shifting it by up to ``± stain_shift``. The
    fine-tuning preset uses it mildly, SimCLR's views (:mod:`medvision.data.views`) strongly."""
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        HEDJitter(
            intensity_scale_range=(1 - stain_scale, 1 + stain_scale),
            intensity_shift_range=(-stain_shift, stain_shift),
            p=0.5,
        ),
    ]


def preset(name: str) -> list[A.BasicTransform]:
    """The named train-time augmentations.

    pathology: flips, rot90 (tissue has no up), mild HED stain jitter (scanner and stain batches).
    radiology: window jitter as brightness/contrast, gamma, small affine; no flips (anatomy has sides).
    """
    if name == "pathology":
        return tissue_invariances(0.1, 0.05)
    if name == "radiology":
        return [
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=0.7),
            A.RandomGamma(gamma_limit=(80, 120), p=0.5),
            A.Affine(scale=(0.95, 1.05), rotate=(-7, 7), translate_percent=(-0.03, 0.03), p=0.5),
        ]
    if name == "none":
        return []
    raise RecipeError(f"augment.preset {name!r} is not one of pathology, radiology, none")


def _transform_names() -> list[str]:
    names = [n for n, obj in vars(A).items() if inspect.isclass(obj) and issubclass(obj, A.BasicTransform)]
    return names + list(OWN_TRANSFORMS)


def explicit(specs: list[Any]) -> list[A.BasicTransform]:
    """Builds ``{name: Class, **kwargs}`` entries; unknown classes and arguments name their path."""
    out = []
    for i, spec in enumerate(specs):
        where = f"augment.transforms[{i}]"
        kwargs = dict(spec.model_extra or {})
        cls = OWN_TRANSFORMS.get(spec.name) or getattr(A, spec.name, None)
        if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
            close = difflib.get_close_matches(spec.name, _transform_names(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{where}.name: {spec.name!r} is not an albumentations or medvision transform{hint}")
        params = inspect.signature(cls.__init__).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in kwargs:
            if key not in params and not accepts_any:
                close = difflib.get_close_matches(key, [p for p in params if p != "self"], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise RecipeError(f"{where}.{key}: {spec.name} has no argument {key!r}{hint}")
        try:
            out.append(cls(**kwargs))
        except Exception as err:  # albumentations validates with pydantic; keep its reason
            raise RecipeError(f"{where}: {spec.name}({kwargs}) is invalid: {err}") from None
    return out


FLIPS = (A.HorizontalFlip, A.VerticalFlip, A.RandomRotate90)


def build_transforms(
    aug: AugmentConfig | None,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    normalize: bool = True,
) -> A.Compose:
    """Resize, then (for training, when ``aug`` is given) augmentation, then normalise and to tensor.

    With ``normalize=False`` the pipeline stops at a [0, 1] float tensor: training and evaluation
    loaders ship that (compacted, see :func:`medvision.data.dataset.prepare`) to the device and
    normalise there with :func:`normalize_batch`. ``aug.on_device`` leaves the preset's flips and
    rotations to :func:`flip_rot90_batch` on the device.
    """
    steps: list[A.BasicTransform] = [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR)]
    if aug is not None and aug.preset == "pathology" and len(mean) != 3:
        raise RecipeError(
            f"augment.preset 'pathology' jitters H&E stain and needs RGB input, but the model takes {len(mean)} "
            "channel(s); use preset radiology or none for greyscale data"
        )
    if aug is not None:
        chosen = preset(aug.preset)
        if aug.on_device:
            if not any(isinstance(t, FLIPS) for t in chosen):
                raise RecipeError(
                    f"augment.on_device moves the preset's flips and rot90 to the device, but preset {aug.preset!r} "
                    "has none; use preset pathology or set on_device: false"
                )
            chosen = [t for t in chosen if not isinstance(t, FLIPS)]
        steps += chosen + explicit(aug.transforms)
    if normalize:
        steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=1.0))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def normalize_batch(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] (float) or 0..255 (uint8) -> float32 normalised by the backbone's mean and std.

    The same arithmetic as albumentations' ``Normalize(max_pixel_value=1.0)``, done wherever ``x`` is
    (on the GPU, after a uint8 copy that is 4x smaller than float32).
    """
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    return (x.float() * scale - _channel_stat(mean, x.device)) / _channel_stat(std, x.device)


@functools.lru_cache(maxsize=32)
def _channel_stat(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A (1, C, 1, 1) constant made once per device: building it per batch was a host-to-device copy per step."""
    return torch.tensor(values, device=device, dtype=torch.float32).view(1, -1, 1, 1)


def flip_rot90_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random horizontal flip, vertical flip and rotation by k * 90 degrees, on ``x``'s device.

    The dihedral group that tissue has no preferred orientation in; each image draws its own
    transform from ``generator`` (seeded per epoch, so a resumed run draws the same ones).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"flip_rot90_batch needs square images, got {tuple(x.shape[-2:])}")
    draws = torch.randint(0, 2, (3, x.shape[0]), generator=generator, device=generator.device).to(x.device)
    hflip, vflip, rot = draws[0].bool(), draws[1].bool(), draws[2].bool()
    x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
    return torch.where(rot.view(-1, 1, 1, 1), x.transpose(-1, -2), x)


TTA_TRANSFORMS = ("hflip", "vflip", "rot90")


def tta_views(x: torch.Tensor, names: tuple[str, ...] | list[str]) -> list[torch.Tensor]:
    """``x`` (B, C, H, W) and, for each name of ``evaluation.tta``, that transform of it: the test-time views.

    ``hflip`` and ``vflip`` mirror the width and height axes; ``rot90`` turns by 90 degrees
    (the image must be square, as every model input here is).
    """
    views = [x]
    for name in names:
        if name == "hflip":
            views.append(x.flip(-1))
        elif name == "vflip":
            views.append(x.flip(-2))
        elif name == "rot90":
            views.append(torch.rot90(x, 1, dims=(-2, -1)))
        else:
            raise ValueError(f"evaluation.tta: {name!r} is not one of {', '.join(TTA_TRANSFORMS)}")
    return views

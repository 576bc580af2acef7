"""albumentations pipelines from the recipe, and the two presets.

Images enter as float32 in [0, 1] (see :mod:`medvision.io.image`), so 16-bit detail survives
augmentation; ``Normalize`` then uses the backbone's own mean and std from timm's data config.
Evaluation always uses resize + normalise only.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from medvision.recipe import AugmentConfig, RecipeError


def preset(name: str) -> list[A.BasicTransform]:
    """The named train-time augmentations.

    pathology: flips, rot90 (tissue has no up), mild HED stain jitter (scanner and stain batches).
    radiology: window jitter as brightness/contrast, gamma, small affine; no flips (anatomy has sides).
    """
    if name == "pathology":
        return [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.HEStain(
                method="preset",
                preset="ruifrok",
                intensity_scale_range=(0.9, 1.1),
                intensity_shift_range=(-0.05, 0.05),
                p=0.5,
            ),
        ]
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
    return [n for n, obj in vars(A).items() if inspect.isclass(obj) and issubclass(obj, A.BasicTransform)]


def explicit(specs: list[Any]) -> list[A.BasicTransform]:
    """Builds ``{name: Class, **kwargs}`` entries; unknown classes and arguments name their path."""
    out = []
    for i, spec in enumerate(specs):
        where = f"augment.transforms[{i}]"
        kwargs = dict(spec.model_extra or {})
        cls = getattr(A, spec.name, None)
        if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
            close = difflib.get_close_matches(spec.name, _transform_names(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{where}.name: {spec.name!r} is not an albumentations transform{hint}")
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


def build_transforms(
    aug: AugmentConfig | None, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> A.Compose:
    """Resize, then (for training, when ``aug`` is given) augmentation, then normalise and to tensor."""
    steps: list[A.BasicTransform] = [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR)]
    if aug is not None and aug.preset == "pathology" and len(mean) != 3:
        raise RecipeError(
            f"augment.preset 'pathology' jitters H&E stain and needs RGB input, but the model takes {len(mean)} "
            "channel(s); use preset radiology or none for greyscale data"
        )
    if aug is not None:
        steps += preset(aug.preset) + explicit(aug.transforms)
    steps += [A.Normalize(mean=mean, std=std, max_pixel_value=1.0), ToTensorV2()]
    return A.Compose(steps)

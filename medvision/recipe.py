"""The recipe: a typed tree loaded strictly from YAML.

A recipe says everything a run needs: where the images are, how they are augmented, which timm
backbone starts from which weights, and the freeze phases that fine-tune it. Unknown keys are
errors that name their full path (``train.phases[1].lrr``) and suggest the nearest valid key,
because a silently ignored typo is a silently different experiment.

Examples:
    >>> recipe = load_recipe("recipes/bloodmnist_effnet_lite0.yaml", overrides=["train.phases[0].epochs=2"])
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from medvision.errors import MedvisionError
from medvision.recipe_nodes import (
    DicomConfig,
    MILSection,
    SlidesConfig,
    TrackingConfig,
    TrainConfig,
    _Node,
    finetune_only_settings,
)
from medvision.recipe_nodes import (
    PhaseConfig as PhaseConfig,  # re-exported: the tree's nodes are imported from here
)

SHARED_DEFAULT = "../shared"


class RecipeError(MedvisionError, ValueError):
    """A recipe that cannot be used; the message names the file, the key path and the fix."""


def check_patient_regex(regex: str | None) -> str | None:
    """``data.patient_regex`` unchanged; a ValueError naming it unless it compiles with one group or ``patient``."""
    try:
        pattern = re.compile(regex or "()")
    except re.error as err:
        raise ValueError(f"{regex!r} is not a regular expression ({err}); expected one group, the patient id") from None
    if pattern.groups != 1 and "patient" not in pattern.groupindex:
        raise ValueError(f"{regex!r} has {pattern.groups} groups; expected one (the patient id) or (?P<patient>...)")
    return regex


def check_class_names(classes: list[str] | None) -> list[str] | None:
    """``data.classes`` unchanged; a ValueError naming it if a name is empty, space-padded or repeated."""
    if classes is not None and (len(set(classes)) < len(classes) or not all(c and c == c.strip() for c in classes)):
        raise ValueError(f"{classes} has an empty, space-padded or repeated name; expected distinct class names")
    return classes


class DataConfig(_Node):
    source: Literal["npz", "folder", "csv", "dicom", "slides", "slide_features"]
    """Where samples come from: a MedMNIST ``.npz``, class subfolders, a CSV manifest, a DICOM folder, a CSV of
    whole slides (``slide_path,label[,patient_id,split]``) cut into tissue tiles, or the same CSV over the
    slides' cached tile features (``medvision features``; the run trains the ``mil`` head by cross-validation)."""
    path: str
    """File or folder of the source; ``${MEDVISION_SHARED}`` expands (default ``../shared``)."""
    classes: Annotated[list[str] | None, AfterValidator(check_class_names)] = None
    """Class names in label order; default: sorted folder names, sorted CSV labels, or ``0..K-1`` for npz."""
    image_size: int = Field(224, ge=8, le=4096)
    """Square side, in pixels, that images are resized to before entering the model."""
    intensity: Literal["dtype", "minmax", "percentile"] = "dtype"
    """How pixel values map to [0, 1]: by the dtype's range (8/16-bit), per-image min-max, or 0.5-99.5 percentiles."""
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Share of samples for validation when the source has no split of its own."""
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Share of samples for test when the source has no split of its own."""
    patient_regex: Annotated[str | None, AfterValidator(check_patient_regex)] = None
    """For folder sources: a regex searched in the file name whose one group (or group ``patient``) is the patient."""
    batch_size: int = Field(64, ge=1)
    """Global training batch size (per optimizer micro-step); under torchrun each of N ranks takes 1/N of it."""
    eval_batch_size: int = Field(256, ge=1)
    """Batch size for validation, test and evaluate (per rank: each rank evaluates its own shard)."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes; ``auto`` is 0 on a CPU-only machine and min(8, cores) with CUDA."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many samples per split (for smoke runs); ``None`` uses all."""
    transfer: Literal["auto", "uint8", "float16", "float32"] = "auto"
    """Dtype of the (unnormalised) batches the loader hands to the device, where they are normalised; ``auto``
    is uint8 when every image of the source is 8-bit (read from each file's header; 4x less to copy than float32)
    and float32 otherwise (16-bit, DICOM windows), decided once for all splits, so train, evaluate and score of
    the same data agree."""
    preload: bool = False
    """Decode every image of a folder or CSV source into memory once, before the workers start, so later
    epochs skip PNG/JPEG/TIFF decoding (``.npz`` is always in memory; DICOM has its own disk cache)."""
    on_error: Literal["stop", "skip"] = "stop"
    """Unreadable (corrupt, truncated) images: ``stop`` the run before training, naming them, or ``skip`` them."""
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    """How DICOM pixels are windowed and which frames are used (``source: dicom`` and ``score``)."""
    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    """How whole slides are tiled: magnification, tile size, tissue rule, stain (``source: slides`` and ``score``)."""
    tiles_per_slide: int | None = Field(None, ge=1)
    """Training tiles sampled per slide per epoch (a new seeded draw each epoch), so big slides do not dominate."""
    features: str | None = None
    """``source: slide_features``: the folder ``medvision features`` wrote (its ``features.csv`` maps each
    ``slide_path`` of the manifest to its ``.h5`` file); ``${MEDVISION_SHARED}`` expands."""
    target: Literal["class", "continuous"] = "class"
    """``source: slide_features``: ``class`` labels (classification) or a ``continuous`` number per slide
    (regression, reported as MSE, MAE and R² with CIs)."""
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Share of the training split used, with its labels: whole patients, stratified by label, at least one
    patient per class, and nested (the 1% subset is inside the 10% one for the same seed); val and test stay whole."""

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction is {self.val_fraction + self.test_fraction}; "
                "it must be below 1 so that something is left to train on"
            )
        return self


class TransformSpec(_Node):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    name: str
    """An albumentations transform class name, e.g. ``HorizontalFlip``; other keys are its arguments."""


class AugmentConfig(_Node):
    preset: Literal["pathology", "radiology", "none"] = "none"
    """A named train-time pipeline: pathology (flips, rot90, HED stain jitter), radiology (window, gamma)."""
    transforms: list[TransformSpec] = Field(default_factory=list)
    """Extra albumentations transforms applied after the preset, each ``{name: Class, arg: value}``."""
    on_device: bool = False
    """Run the preset's flips and 90-degree rotations on the device, per batch, instead of in the CPU workers."""


class ModelConfig(_Node):
    name: str
    """Any ``timm.create_model`` name, e.g. ``resnet18`` or ``tf_efficientnet_lite0``."""
    pretrained: bool | str = False
    """``true``: timm's hub weights; a path: a local ``.safetensors``/``.pth`` read offline; ``false``: random."""
    init_from: str | None = None
    """A medvision run folder or checkpoint to start from (medical pretraining); a new head if classes differ."""
    in_chans: int | None = Field(None, ge=1)
    """Input channels; default: 1 for grayscale sources, 3 otherwise. timm adapts the stem weights."""
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout before the classifier."""
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Stochastic depth rate, for backbones that support it."""


class OperatingPointConfig(_Node):
    rule: Literal["youden", "sensitivity", "specificity"]
    """``youden`` maximises sensitivity + specificity - 1; the others reach ``target`` on validation."""
    target: float | None = Field(None, gt=0.0, le=1.0)
    """Sensitivity or specificity to reach on the validation split, e.g. 0.95; not used by ``youden``."""

    @model_validator(mode="after")
    def _target_matches_rule(self) -> OperatingPointConfig:
        if self.rule == "youden" and self.target is not None:
            raise ValueError("rule 'youden' takes no target; use rule: sensitivity or specificity with a target")
        if self.rule != "youden" and self.target is None:
            raise ValueError(f"rule {self.rule!r} needs a target, e.g. target: 0.95")
        return self


def _default_points() -> list[OperatingPointConfig]:
    return [
        OperatingPointConfig(rule="youden"),
        OperatingPointConfig(rule="sensitivity", target=0.95),
        OperatingPointConfig(rule="specificity", target=0.95),
    ]


class EvalConfig(_Node):
    bootstrap: int = Field(1000, ge=0)
    """Stratified bootstrap resamples for the 95% CIs of AUC, accuracy, sensitivity and specificity; 0 is off."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling, so reported CIs are reproducible."""
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    """Coverage of the confidence intervals."""
    calibrate: bool = True
    """Fit a temperature on validation logits; test metrics, reports and ``score`` use calibrated probabilities."""
    positive_class: str | None = None
    """The class operating points are about; default the second class of a binary task. With more
    classes, set it to get one-vs-rest operating points for that class (otherwise there are none)."""
    operating_points: list[OperatingPointConfig] = Field(default_factory=_default_points)
    """Thresholds chosen on the validation split and applied, unchanged, to test and to ``score``."""
    patient_aggregate: Literal["mean", "max", "topk", "abmil"] = "mean"
    """How image (tile) probabilities become one per patient (per slide for ``source: slides``); ``abmil``
    (slides only) trains an attention-MIL head on the fine-tuned backbone's frozen tile features."""
    top_k: int = Field(3, ge=1)
    """Images averaged per patient by ``patient_aggregate: topk`` (the k most positive)."""
    explain: int = Field(4, ge=0)
    """Most confident false positives and false negatives shown with Grad-CAM in the report; 0 is off."""
    explain_method: Literal["gradcam", "gradcam++"] = "gradcam"
    """Heatmap method of the report's explanation panel."""
    tta: list[Literal["hflip", "vflip", "rot90"]] = Field(default_factory=list)
    """Test-time augmentation: calibrated probabilities are averaged over the image and these transforms of it,
    in the temperature and thresholds fitted on validation, in test metrics, ``evaluate`` and ``score``."""


class PretrainConfig(_Node):
    method: Literal["simclr"] = "simclr"
    """Self-supervised objective: SimCLR's NT-Xent contrastive loss (Chen et al. 2020) on two views per image."""
    epochs: int = Field(20, ge=1)
    """Passes over the unlabelled training images."""
    lr: float = Field(5e-4, gt=0.0)
    """Peak AdamW learning rate (cosine decay after warmup); weight decay is ``train.weight_decay``."""
    warmup: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the steps spent in linear LR warmup."""
    temperature: float = Field(0.2, gt=0.0)
    """NT-Xent temperature; 0.1-0.5 suits batches of 64-512."""
    proj_dim: int = Field(128, ge=8)
    """Width of the projection head's output, where the loss is computed (the head is dropped afterwards)."""
    proj_hidden: int = Field(512, ge=8)
    """Hidden width of the two-layer projection head."""
    views: Literal["auto", "pathology", "radiology"] = "auto"
    """Two-view augmentation: ``pathology`` (crops, flips, rot90, stain and colour jitter, blur), ``radiology``
    (crops, window jitter, gamma, blur, noise; no colour, no flips); ``auto`` follows ``augment.preset``, else
    radiology for greyscale and pathology for colour images."""
    min_crop: float = Field(0.3, gt=0.0, le=1.0)
    """Smallest area fraction of a random resized crop."""
    knn_samples: int = Field(2000, ge=0)
    """Labelled validation images of the per-epoch kNN health check (leave-one-out accuracy); 0 turns it off."""


class Recipe(_Node):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Run name; the run folder is ``<output_dir>/<name>``."""
    seed: int = 0
    """Seed for splits, initialisation, data order and augmentation."""
    output_dir: str = "runs"
    """Folder that holds run folders."""
    data: DataConfig
    """Where the images come from and how they are split and batched."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Train-time augmentation; evaluation always uses resize and the backbone's normalisation only."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name=""))
    """The timm backbone and its starting weights (required, except for ``data.source: slide_features``)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Freeze phases, optimizer, precision and checkpointing policy."""
    mil: MILSection = Field(default_factory=MILSection)
    """``data.source: slide_features``: the MIL head on the cached tile features and its cross-validation."""
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    """Confidence intervals, calibration, operating points and patient-level aggregation of the report."""
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """Self-supervised pretraining (``medvision pretrain``) on the training images, labels ignored."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking: MLflow and TensorBoard, both off by default (``--track`` turns MLflow on)."""

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        given = self.model_fields_set
        if self.data.source == "slide_features":
            if self.data.features is None:
                raise ValueError("data.source 'slide_features' needs data.features: the folder `medvision features` "
                                 "wrote")  # fmt: skip
            defaults = {"model": ModelConfig(name=""), "train": TrainConfig(), "augment": AugmentConfig(),
                        "pretrain": PretrainConfig()}  # fmt: skip
            ignored = [k for k, v in defaults.items() if getattr(self, k) != v]
            if ignored:
                raise ValueError(f"{', '.join(ignored)} do not apply to data.source 'slide_features' (the tile "
                                 "features are frozen; the MIL head is set under mil)")  # fmt: skip
            if self.data.target == "continuous" and self.mil.head == "clam_sb":
                raise ValueError("mil.head 'clam_sb' needs classes (its instance loss); use abmil, transmil or mean "
                                 "for a continuous target")  # fmt: skip
            if self.mil.head == "transmil" and self.mil.hidden % self.mil.heads:
                raise ValueError(f"mil.hidden {self.mil.hidden} must divide by mil.heads {self.mil.heads}")
            return self
        if "model" not in given or not self.model.name:
            raise ValueError("model.name is required: a timm backbone, e.g. model: {name: resnet18, pretrained: true}")
        if "train" not in given:
            raise ValueError("train is required: at least train.phases (see recipes/ for examples)")
        if self.mil != MILSection():
            raise ValueError("mil applies to data.source 'slide_features' only")
        if self.data.target != "class":
            raise ValueError("data.target 'continuous' applies to data.source 'slide_features' only")
        if self.train.amp == "fp16" and self.train.device == "cpu":
            raise ValueError("train.amp 'fp16' needs a CUDA device (it uses a GradScaler); use 'bf16' on CPU")
        if self.model.init_from and self.model.pretrained:
            raise ValueError(
                "model.init_from and model.pretrained both set; init_from already supplies the weights, "
                "so set pretrained: false"
            )
        if self.evaluation.patient_aggregate == "abmil" and self.data.source != "slides":
            raise ValueError("evaluation.patient_aggregate 'abmil' needs data.source 'slides' (bags of tiles)")
        if self.data.tiles_per_slide is not None and self.data.source != "slides":
            raise ValueError("data.tiles_per_slide applies to data.source 'slides' only")
        if self.train.balance == "sampler" and self.data.tiles_per_slide is not None:
            raise ValueError("train.balance 'sampler' and data.tiles_per_slide both choose each epoch's samples; "
                             "use balance: loss with tiles_per_slide")  # fmt: skip
        ignored = finetune_only_settings(self.train) if self.train.protocol != "finetune" else []
        if ignored:
            values = ", ".join(f"train.{k}: {getattr(self.train, k)!r}" for k in ignored)
            raise ValueError(f"{values}: fine-tuning setting(s) that protocol {self.train.protocol!r} never reads (it "
                             "trains no network, only a head on frozen features); remove them or use protocol "
                             "finetune")  # fmt: skip
        if (self.train.mixup > 0 or self.train.cutmix > 0) and self.train.focal_gamma > 0:
            raise ValueError("train.focal_gamma needs hard labels; train.mixup / train.cutmix make them soft. Use one")
        if len(set(self.evaluation.tta)) != len(self.evaluation.tta):
            raise ValueError(f"evaluation.tta lists a transform twice: {self.evaluation.tta}")
        return self

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.train.phases)

    def changed(self, changes: dict[str, Any], origin: str = "<changed recipe>") -> Recipe:
        """A validated copy with ``changes`` applied (``{"train.amp": "bf16", "data.limit": None}``, keys as in
        ``--set``). A recipe never changes once loaded: every task that adjusts one works on such a copy, which
        passes the same rules as a recipe as written.

        Examples:
            >>> fp32 = recipe.changed({"train.amp": "none"})
        """
        tree = self.model_dump(mode="python")
        for key, value in changes.items():
            set_key(tree, key, value)
        try:
            return Recipe.model_validate(tree)
        except ValidationError as err:
            raise _explain(err, origin) from None


# ----------------------------------------------------------------------------------- loading


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(value: str) -> str:
    """Expands ``${VAR}`` and ``${VAR:-default}``; ``MEDVISION_SHARED`` defaults to ``../shared``."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if name == "MEDVISION_SHARED":
            return SHARED_DEFAULT
        raise RecipeError(f"environment variable ${{{name}}} is not set (used in path {value!r})")

    return os.path.expanduser(_ENV.sub(sub, value))


def _parse_key_path(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for token in key.split("."):
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[-?\d+\])*)", token)
        if not match:
            raise RecipeError(f"override key {key!r}: cannot parse {token!r}; expected e.g. train.phases[1].lr")
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(-?\d+)\]", match.group(2)))
    return parts


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Applies ``a.b[1].c=value`` to a raw recipe dict; the value is parsed as YAML (``3`` is an int)."""
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r} has no '='; expected KEY=VALUE, e.g. train.phases[0].lr=1e-3")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise RecipeError(f"override {assignment!r}: its value {raw!r} is not valid YAML ({problem}); quote a "
                          "string, e.g. data.path='a: b'") from None  # fmt: skip
    set_key(tree, key.strip(), value)


def set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    """Sets ``a.b[1].c`` in a raw recipe dict to ``value``, making the mappings on the way."""
    parts = _parse_key_path(key)
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                raise RecipeError(f"override {key!r}: index [{part}] is out of range")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"override {key!r}: {part!r} is not inside a mapping")
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            raise RecipeError(f"override {key!r}: index [{last}] is out of range")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise RecipeError(f"override {key!r}: cannot set {last!r} on a non-mapping")
        node[last] = value


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the recipe node that holds ``loc`` (for 'did you mean' suggestions)."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        inner = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None:
            return []
        cls = inner
    return list(cls.model_fields)


def _explain(err: ValidationError, origin: str) -> RecipeError:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = _format_loc(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  {where}: unknown key{hint} (valid keys here: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"  {where}: {e['msg']}{shown}")
    return RecipeError(f"invalid recipe {origin}:\n" + "\n".join(lines))


def _resolve_paths(recipe: Recipe, origin: str) -> Recipe:
    """Expands variables and makes every path absolute, so a saved recipe reproduces from anywhere."""
    values = {"data.path": recipe.data.path, "output_dir": recipe.output_dir, "data.features": recipe.data.features,
              "data.slides.stain_reference": recipe.data.slides.stain_reference,
              "model.pretrained": recipe.model.pretrained if isinstance(recipe.model.pretrained, str) else None,
              "model.init_from": recipe.model.init_from}  # fmt: skip
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if not value and key not in ("data.path", "output_dir"):
            continue
        try:
            changes[key] = str(Path(expand_path(value or "")).resolve())
        except RecipeError as err:
            raise RecipeError(f"invalid recipe {origin}:\n  {key}: {err}") from None
    return recipe.changed(changes)


def recipe_from_dict(tree: dict[str, Any], origin: str = "<dict>", overrides: list[str] | None = None) -> Recipe:
    """Validates a raw recipe dict (after applying ``overrides``) into a :class:`Recipe`."""
    if not isinstance(tree, dict):
        raise RecipeError(f"invalid recipe {origin}: the top level must be a mapping, got {type(tree).__name__}")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, origin) from None
    return _resolve_paths(recipe, origin)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads a YAML recipe with ``yaml.safe_load``, applies ``--set`` overrides and validates it.

    Relative paths inside the recipe are taken from the current directory.

    Examples:
        >>> load_recipe("recipes/demo.yaml", ["train.phases[1].lr=3e-4"]).train.phases[1].lr
        0.0003
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {str(path)!r} is a folder; expected a recipe YAML file")
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # SafeLoader's tags only
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#x} at offset "
                          f"{err.start}); save it as UTF-8") from None  # fmt: skip
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {err}") from None
    return recipe_from_dict(tree if tree is not None else {}, origin=repr(str(path)), overrides=overrides)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (the same safe tags), but a key given twice in one mapping is an error: YAML
    keeps the last silently, and ``lr: 3e-3`` then ``lr: 9.0`` would train a different experiment than it reads."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice (lines "
                                                        f"{seen[key]} and {line}); keep one")  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def tree_changes(was: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in was, value in now)`` for every leaf of two nested settings trees (a dumped recipe, a
    fold's settings) that differs, sorted by key; a key one side lacks is None there. What a resume compares."""

    def flat(tree: dict[str, Any], stem: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{stem}{key}.") if isinstance(value, dict) else {f"{stem}{key}": value})
        return out

    a, b = flat(was), flat(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, ready to be saved into a run folder."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

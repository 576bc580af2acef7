"""The recipe's leaf sections: how DICOM pixels are windowed, how slides are tiled, the MIL head, and training.

Split from :mod:`medvision.recipe` for size only: the tree, its loading and its rules live there, and every
section is imported from there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medvision.io.dicom import parse_window


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True, frozen=True)


WindowItem = str | list[float] | dict[str, float]


def _file_window() -> list[WindowItem]:
    return ["file"]


class DicomConfig(_Node):
    windows: list[WindowItem] = Field(default_factory=_file_window)
    """VOI windows, one channel each: ``file``, ``file:<i>``, ``percentile``, a preset (lung, mediastinum,
    soft_tissue, bone, brain, subdural, liver) or ``{center: C, width: W}``."""
    voi_function: Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"] | None = None
    """Windowing function; default: the file's VOILUTFunction, else LINEAR."""
    frames: Literal["first", "middle", "all", "tiled"] = "first"
    """Multi-frame files: the first or middle frame, each frame as a sample, or (``tiled``) a whole-slide
    image's tiles assembled into one image."""
    labels: str | None = None
    """CSV with ``label`` and ``path`` (relative to the folder) or ``sop_instance_uid``; default: class folders."""
    cache: bool = True
    """Cache decoded, windowed pixels as float32 ``.npy`` files (the pixels exactly, as ``score`` decodes them),
    filled as the table is built (damaged pixels are found before training), so epochs skip decoding."""

    @field_validator("windows")
    @classmethod
    def _known_windows(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("at least one window is needed")
        for item in value:
            parse_window(item)
        return value


class SlidesConfig(_Node):
    target_mpp: float = Field(0.5, gt=0.0)
    """Microns per pixel of the tiles (0.5 is about 20x, 0.25 about 40x); read from the best pyramid level."""
    tile_size: int = Field(224, ge=16, le=4096)
    """Tile side in pixels at ``target_mpp`` (tiles are then resized to ``data.image_size`` if it differs)."""
    min_tissue: float = Field(0.5, ge=0.0, le=1.0)
    """Keep tiles whose tissue fraction (from the thumbnail's tissue mask) is at least this."""
    tissue_method: Literal["saturation", "od"] = "saturation"
    """Tissue detection: Otsu on HSV saturation, or on optical density (also keeps dark tissue of little colour,
    which saturation misses; pale pink tissue is found by saturation only)."""
    tissue_mpp: float = Field(8.0, gt=0.0)
    """Resolution (µm/px) of the thumbnail that tissue is detected on."""
    mpp: float | None = Field(None, gt=0.0)
    """Level-0 microns per pixel of every slide, for scans whose files lack it; default: the file's metadata."""
    max_tiles_per_slide: int | None = Field(None, ge=1)
    """Keep at most this many tissue tiles of each slide (a seeded random choice), for every split and score."""
    backend: Literal["auto", "openslide", "tiffslide", "dicom"] = "auto"
    """Slide reader: ``auto`` picks wsidicom for DICOM folders, tiffslide for OME-TIFF, else OpenSlide."""
    tile_cache: bool = False
    """Store each tile, once read (and stain-normalised), in a memory-mapped cache so later epochs skip decoding."""
    stain_reference: str | None = None
    """An RGB reference tile (PNG/TIFF): Macenko stain normalisation of every tile to its stain colours."""
    jpeg_shrink: bool = True
    """Let the JPEG decoder shrink tiles read at least twice ``tile_size`` (libjpeg's scaled IDCT: faster reading,
    within about a grey level of area averaging); false: the pixels of OpenSlide resized by area."""

    @classmethod
    def recorded(cls, section: dict[str, Any]) -> SlidesConfig:
        """The section a run or feature folder recorded: one recorded before ``jpeg_shrink`` existed read its tiles
        at full size, and new slides are read as its were."""
        return cls.model_validate({"jpeg_shrink": False, **section})


class MILSection(_Node):
    head: Literal["mean", "abmil", "clam_sb", "transmil"] = "abmil"
    """The MIL model: ``mean`` (mean-pool linear baseline), ``abmil``, ``clam_sb`` (with its instance loss) or
    ``transmil``."""
    folds: int = Field(5, ge=2, le=20)
    """k of the k-fold cross-validation, grouped by patient (no patient's slides on both sides of a fold)."""
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    """Share of each fold's training patients held out for early stopping, as one of ``round(1 / val_fraction)``
    stratified patient folds (0.3 holds out about a third; the report gives the share held out)."""
    epochs: int = Field(40, ge=1)
    """Most passes over the training bags of a fold; early stopping usually ends sooner."""
    lr: float = Field(5e-4, gt=0.0)
    """Adam learning rate (ABMIL's 5e-4)."""
    weight_decay: float = Field(1e-4, ge=0.0)
    """Adam L2 weight decay (ABMIL's 1e-4)."""
    patience: int = Field(10, ge=1)
    """Epochs without a lower validation loss before a fold stops; its best epoch's weights are kept."""
    hidden: int = Field(128, ge=1)
    """Width of the per-tile embedding."""
    attention: int = Field(64, ge=1)
    """Width of the attention branch (abmil, clam_sb)."""
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """Dropout of the head; default its own: 0.25 for mean, abmil and clam_sb, 0.1 for transmil (its reference's)."""
    heads: int = Field(8, ge=1)
    """Attention heads of ``transmil``; ``hidden`` must divide by it."""
    k: int = Field(8, ge=1)
    """CLAM-SB: tiles from each end of the attention ranking for the instance loss."""
    bag_weight: float = Field(0.7, ge=0.0, le=1.0)
    """CLAM-SB: weight of the bag loss; the instance loss gets the rest."""
    subtyping: bool | None = None
    """CLAM-SB: CLAM's ``--subtyping`` (each other class's instance classifier learns the slide's most attended
    tiles as negatives); default on with more than two classes, off with two (tumour against normal). Set it
    true for a two-class subtyping task where each class has its own tissue (LUAD against LUSC)."""
    max_tiles_train: int | None = Field(None, ge=1)
    """Random tiles kept per bag per training step, for speed; default all, as the references train. A cap can
    leave out every tumour tile of a slide whose label rests on a few. Validation and prediction see all."""


class TrackingConfig(_Node):
    mlflow: bool = False
    """Log the run to MLflow: the recipe as parameters, each epoch's metrics, the final metrics with their CIs,
    the run folder's report, metrics and recipe, and the calibrated model (``medvision train --track``)."""
    uri: str | None = Field(None, min_length=1)
    """MLflow tracking URI, e.g. ``http://127.0.0.1:5000`` or ``sqlite:///mlflow.db``; default
    ``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<output_dir>/mlflow.db``, a local store beside the run
    folders (no server needed)."""
    experiment: str = Field("medvision", min_length=1)
    """MLflow experiment the run is logged under; created when it does not exist."""
    log_model: bool = True
    """Log the calibrated model as an MLflow pyfunc model (the ONNX export, checked against PyTorch)."""
    tensorboard: bool = False
    """Write each epoch's metrics as TensorBoard scalars into ``<run folder>/tensorboard``."""
    log_predictions: bool = False
    """Also upload ``predictions.csv``, ``data_audit.csv`` and ``train.log``. Off by default: they name every file,
    and a DICOM archive's paths (``DOE_JANE_MRN1234/IM0001.dcm``) name patients; a tracking server is shared."""


class PhaseConfig(_Node):
    name: str = ""
    """A label for logs and the history; default ``phase<i>``."""
    epochs: int = Field(ge=1)
    """Epochs in this phase."""
    trainable: list[str] = Field(default_factory=lambda: ["all"])
    """What trains: ``head``, ``all``, ``stem``, ``stage:<i>``, ``last_stages:<n>`` or timm module prefixes."""
    lr: float = Field(gt=0.0)
    """Peak learning rate of this phase (AdamW, cosine decay after warmup)."""
    bn: Literal["frozen", "train"] = "train"
    """``frozen`` keeps BatchNorm running statistics fixed; frozen layers' BN is always fixed."""
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    """Layer-wise LR decay: each block towards the stem gets ``lr * layer_decay**depth``; ``None`` is off."""
    warmup: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the phase's steps spent in linear LR warmup."""

    @field_validator("trainable", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainConfig(_Node):
    protocol: Literal["finetune", "linear_probe", "knn"] = "finetune"
    """``finetune`` trains the freeze phases; ``linear_probe`` fits a logistic-regression head on the frozen
    backbone's cached features; ``knn`` classifies by the nearest training images in the frozen feature space."""
    phases: list[PhaseConfig] = Field(default_factory=list)
    """The freeze phases, run in order; each sets epochs, trainable parts, LR, BN policy and layer decay."""
    balance: Literal["none", "sampler", "loss"] = "none"
    """Class imbalance: ``sampler`` draws each epoch's samples class-balanced (seeded, resumable); ``loss``
    weights the loss by inverse class frequency (and ``linear_probe`` its logistic regression)."""
    focal_gamma: float = Field(0.0, ge=0.0)
    """Focal loss exponent (Lin et al. 2017): ``(1 - p_true) ** gamma`` down-weights easy samples; 0 is plain CE."""
    knn_k: int = Field(20, ge=1)
    """Neighbours that vote in the ``knn`` protocol (and the pretraining health check)."""
    knn_temperature: float = Field(0.07, gt=0.0)
    """Votes weigh ``exp(cosine / knn_temperature)`` (Wu et al. 2018)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when present."""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """Mixed precision: bf16 autocast, fp16 with a GradScaler (GPU only), or fp32 (``none``).

    ``auto`` picks bf16 on a GPU or a CPU with native bf16 (Ampere or later; AVX512-BF16/AMX), fp16 on an older
    CUDA GPU, and fp32 on other CPUs, where bf16 is emulated and measured about 10x slower. It covers training
    and the epochs' validation; the run's final metrics, calibration, thresholds and predictions are computed in
    float32, as ``score`` and the exports compute."""
    channels_last: bool = True
    """Keep activations in NHWC memory layout (faster convolutions with AMP)."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    weight_decay: float = Field(0.05, ge=0.0)
    """AdamW weight decay (L2 regularisation); never applied to norm and bias parameters."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Cross-entropy label smoothing."""
    mixup: float = Field(0.0, ge=0.0)
    """Mixup's Beta(alpha, alpha) (Zhang et al. 2018), timm's ``Mixup``: each training batch is blended with
    itself reversed, and so are its one-hot labels; 0 is off. Typical: 0.2-0.8."""
    cutmix: float = Field(0.0, ge=0.0)
    """CutMix's Beta(alpha, alpha) (Yun et al. 2019): a box of the reversed batch is pasted in, labels mixed by
    area; 0 is off. With ``mixup`` too, each batch uses one of the two (``mix_switch``)."""
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)
    """Share of training batches that are mixed when ``mixup`` or ``cutmix`` is on."""
    mix_switch: float = Field(0.5, ge=0.0, le=1.0)
    """With both on: the chance that a mixed batch uses CutMix rather than Mixup."""
    ema: float | None = Field(None, gt=0.0, lt=1.0)
    """Exponential moving average of the weights (timm's ``ModelEmaV3``), e.g. 0.999: updated after every
    optimizer step, with its warm-up (the decay rises from 0 towards this value over the first steps).
    Validation, the best checkpoint and everything after (test, export, score) use the averaged weights;
    ``None`` is off."""
    grad_clip: float | None = Field(None, gt=0.0)
    """Clip the global gradient norm to this value; ``None`` is off."""
    accumulate: int = Field(1, ge=1)
    """Micro-batches per optimizer step (gradient accumulation)."""
    monitor: Literal["val_auc", "val_acc", "val_loss"] = "val_auc"
    """Validation metric that picks the best checkpoint and drives early stopping."""
    monitor_tolerance: float = Field(0.002, ge=0.0, lt=1.0)
    """``val_auc``/``val_acc``: an epoch within this of the best (and of the highest seen) is a tie, decided by the
    lower validation loss, so noise-level AUC gains do not pick a worse-calibrated model; 0 compares exactly."""
    patience: int | None = Field(None, ge=1)
    """End a freeze phase after this many of its epochs without improvement of ``monitor``, and go on to the next
    phase (the last phase's early stop ends the run); the count restarts with each phase, the best checkpoint is
    the best of all phases. ``None`` never stops early."""
    log_interval: int = Field(10, ge=1)
    """Steps between progress-bar updates (and loss finiteness checks, which need a device sync)."""
    sync_bn: bool = False
    """On several GPUs, convert BatchNorm to SyncBatchNorm: statistics over the global batch, not each rank's."""
    deterministic: bool = False
    """Bit-identical reruns of the same recipe on the same machine: deterministic kernels only
    (``torch.use_deterministic_algorithms``; an op without one is an error that names it) and no cuDNN
    autotuning. Costs speed on GPUs, little on a CPU. ``medvision train --deterministic`` sets it."""

    @field_validator("phases")
    @classmethod
    def _named_phases(cls, phases: list[PhaseConfig]) -> list[PhaseConfig]:
        """A phase without a name is called ``phase<i>`` in logs and history."""
        return [p if p.name else p.model_copy(update={"name": f"phase{i}"}) for i, p in enumerate(phases)]


#: What only the fine-tuning loop reads: ``linear_probe`` and ``knn`` train no network, so they refuse these.
FINETUNE_ONLY = ("focal_gamma", "label_smoothing", "mixup", "cutmix", "mix_prob", "mix_switch", "ema", "grad_clip",
                 "accumulate", "patience", "monitor", "monitor_tolerance", "weight_decay", "compile")  # fmt: skip


def finetune_only_settings(train: TrainConfig) -> list[str]:
    """The :data:`FINETUNE_ONLY` settings of ``train`` that differ from their defaults."""
    default = TrainConfig()
    return [key for key in FINETUNE_ONLY if getattr(train, key) != getattr(default, key)]

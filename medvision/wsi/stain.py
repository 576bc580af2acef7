"""Stain maths of H&E tiles: Macenko normalisation to one reference tile, and the HED stain jitter.

Scanners and staining batches give the same tissue different colours; Macenko et al. (M. Macenko, M.
Niethammer, J. S. Marron et al., "A method for normalizing histology slides for quantitative analysis",
ISBI 2009) estimate a tile's two stain vectors (hematoxylin, eosin) in optical-density (OD) space and
re-render its stain concentrations with a reference tile's vectors. Unlike the HED jitter in
:mod:`medvision.data.transforms` (augmentation: random, train only), this is preprocessing: fixed,
deterministic, and applied to training, validation and scoring tiles alike.

The maths is torchstain's numpy ``MacenkoNormalizer`` (a port of the authors' reference code). It was
checked on the shared H&E tiles: fitted to NORM, the distance of each tissue tile's estimated stain
matrix from the reference's fell from 0.14-0.27 to 0.01-0.10; fit and output are deterministic and
survive pickling; about 16 ms per 224 px tile and 70 ms per 512 px tile on one CPU core. It is not
safe on tissue-poor input, which this module guards against:

- glass (a white or background tile) has no pixels with OD above ``beta``: torchstain raises
  ``LinAlgError`` (an eigen-decomposition of the covariance of no pixels);
- a few stained pixels (under ~25) give stain vectors with negative OD and a negative concentration
  scale; a white tile with a 3 x 3 stained speck came back dark purple everywhere;
- one flat colour has a rank-one OD cloud, so both stain vectors are the same and a pink tile turns
  dark purple; with scanner noise the cloud is round instead, and every such tile (pink, grey, ink,
  near-black) came back as the same dark purple noise.

- a large tile that is mostly glass: Macenko's concentration scale is the 99th percentile over *all* of a
  tile's pixels, so once tissue is under about 1% of them the scale is glass's and collapses. The same
  mucosa tile repeated 3 x 3 (672 px, 0.6% tissue) came back dark purple where once (224 px) it was left
  alone, and a 100 px patch of stroma in a 1024 px glass tile came back black.

So a tile with fewer than ``min_tissue_pixels`` tissue pixels (OD >= ``beta`` in every channel, the
same mask torchstain uses), or with tissue under ``min_tissue_fraction`` of its pixels, or whose tissue OD
spans no stain plane (a line, or a round noise cloud), is returned unchanged: normalising glass is
meaningless and the decomposition is unstable there. The default of 2000 pixels is where the estimate
settles: stain matrices of random crops of the shared tiles, compared with the whole tile's, had a median
error of 0.07 with 1000-2000 tissue pixels and 0.02 with 2000-5000. The default fraction, 0.04, is the share
2000 pixels are of the 224 px tiles that was measured on, so a tile's fate depends on what it shows, not on
its size: at 4% the 99th percentile lies in the top quarter of the tissue, never in the glass.

A tile of a single stain (pure eosin muscle) or a uniformly pale one is still re-rendered, and
Macenko's 99th-percentile concentration scaling darkens it toward the reference; that is the method,
not a numerical failure. The output is torchstain's, which truncates to uint8 rather than rounding.

The HED jitter (:func:`hed_jitter`, the augmentation :class:`medvision.data.transforms.HEDJitter` draws for)
is colour deconvolution with Ruifrok & Johnston's full hematoxylin-eosin-DAB basis: three vectors span OD
space, so deconvolving and recombining is exact, and the DAB row keeps what two stains do not explain (glass
tint, pigment, the scanner's cast). albumentations 2.0.8's ``HEStain`` deconvolves with two rows (H and E) and
rebuilds the tile from them alone, so even at scale 1 and shift 0 it dropped that residual: on the shared H&E
tiles the mean red and green fell by up to 7 grey levels and blue rose by 6-52, a blue cast on the half of the
training tiles it touched that no validation, test or scored tile has.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import albumentations as A
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import Field, field_validator

from medvision.io.image import ImageReadError, read_image_raw

if TYPE_CHECKING:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

#: Tissue pixels (OD >= beta in every channel) below which a tile is left as it is; see the module docstring.
DEFAULT_MIN_TISSUE_PIXELS = 2000
#: Share of a tile's pixels that must be tissue: 2000 of a 224 px tile's 50176 (see the module docstring).
DEFAULT_MIN_TISSUE_FRACTION = 0.04
#: The stain angles are the alpha and 100 - alpha percentiles of the tissue pixels; a handful is no estimate.
MIN_TISSUE_PIXELS_FLOOR = 10
#: Second over first eigenvalue of the tissue OD covariance below this: the pixels lie on a line (one
#: colour), so the plane both stain vectors are sought in is undefined. Real tiles measured 0.017-0.11.
MIN_PLANE_RATIO = 1e-6
#: ... and above this the cloud is nearly as wide as it is long: scanner noise around one colour, with no stain
#: axis to find. The shared H&E tissue tiles measured 0.017-0.11 (debris the highest); flat colours with pixel
#: noise of SD 1-5 grey levels 0.44-0.99 (pink, grey, blue and green ink, near-black), which Macenko turned into
#: the same dark purple noise whatever their colour. A very saturated flat colour (one channel far darker than
#: the others) makes a narrower noise cloud and is not caught.
MAX_PLANE_RATIO = 0.3


def optical_density(intensity: np.ndarray, io: float) -> np.ndarray:
    """Beer-Lambert optical density ``-log((I + 1) / io)`` of intensities ``I`` on the 0-255 scale (any float dtype).

    torchstain's formula: the ``+ 1`` keeps black finite, ``io`` is the glass brightness (OD 0). The one OD
    conversion of this package; :func:`intensity_from_od` is its exact inverse.
    """
    return -np.log((intensity + 1.0) / io)


def intensity_from_od(od: np.ndarray, io: float) -> np.ndarray:
    """The intensities (0-255 scale, unclipped) whose :func:`optical_density` is ``od``."""
    return io * np.exp(-od) - 1.0


def _od_table(io: int) -> np.ndarray:
    """OD of each of the 256 uint8 values: 256 logs instead of one per pixel, bit-identical to torchstain's."""
    return optical_density(np.arange(256, dtype=np.float64), io)


def tissue_od(rgb: np.ndarray, *, io: int = 240, beta: float = 0.15) -> np.ndarray:
    """(N, 3) optical density ``-log((I + 1) / io)`` of the pixels with OD >= ``beta`` in every channel.

    torchstain's formula and mask. Beer-Lambert: stain absorbances add in OD space, so a mixture of two
    stains is a sum of two vectors; the ``+ 1`` keeps black finite; ``beta`` separates tissue from glass.
    """
    flat = rgb.reshape(-1, 3)
    table = _od_table(io)
    dark = table >= beta  # a test per uint8 value, so the mask needs no float image
    keep = dark[flat[:, 0]] & dark[flat[:, 1]] & dark[flat[:, 2]]
    return table[flat[keep]]


def spans_plane(od: np.ndarray) -> bool:
    """Whether tissue OD pixels spread along the plane of two stains, as the two-stain model needs: not a line
    (one flat colour) and not a round cloud (pixel noise around one colour); see :data:`MAX_PLANE_RATIO`."""
    if len(od) < 3:
        return False
    eig = np.linalg.eigvalsh(np.cov(od.T))
    return bool(np.all(np.isfinite(eig)) and eig[2] > 0 and MIN_PLANE_RATIO <= eig[1] / eig[2] <= MAX_PLANE_RATIO)


def _check_rgb(rgb: Any, what: str) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"dtype {rgb.dtype}, shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"{what}: expected an RGB uint8 image of shape (H, W, 3), got {got}")
    return rgb


def _check_params(io: int, alpha: float, beta: float, min_tissue_pixels: int, min_tissue_fraction: float) -> None:
    if not 1 <= io <= 255:
        raise ValueError(f"io (transmitted light intensity) must be in 1..255, got {io}")
    if not 0.0 < alpha < 50.0:
        raise ValueError(f"alpha (percentile of the stain angles) must be in (0, 50), got {alpha}")
    if not (math.isfinite(beta) and beta > 0.0):
        raise ValueError(f"beta (OD threshold for tissue) must be a positive number, got {beta}")
    if min_tissue_pixels < MIN_TISSUE_PIXELS_FLOOR:
        raise ValueError(f"min_tissue_pixels must be at least {MIN_TISSUE_PIXELS_FLOOR}, got {min_tissue_pixels}")
    if not 0.01 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must be in 0.01..1 (below 1% Macenko's 99th-percentile scale is the "
                         f"glass's), got {min_tissue_fraction}")  # fmt: skip


class MacenkoNormalizer:
    """Re-renders H&E tiles with a reference tile's stain vectors and concentration scale (Macenko 2009).

    Fitting is done once, here; calling it is a pure function of the tile, so it is deterministic and the
    object pickles into DataLoader workers. Tiles with too little tissue come back unchanged (a copy).

    Args:
        reference: RGB uint8 tile, mostly stained tissue, whose colours the others should take.
        io: transmitted light intensity (the glass brightness) that OD is measured against.
        alpha: the stain vectors are the ``alpha`` and ``100 - alpha`` percentile angles of tissue OD.
        beta: OD every channel of a pixel must reach to count as tissue rather than glass.
        min_tissue_pixels: tiles (and the reference) with fewer tissue pixels are not normalised.
        min_tissue_fraction: nor are tiles (and the reference) whose tissue is a smaller share of their pixels.

    Raises:
        ValueError: the reference is not RGB uint8, has too little tissue, or gives an invalid fit.

    Examples:
        >>> norm = MacenkoNormalizer(load_reference("refs/tumour.png"))  # doctest: +SKIP
        >>> out = norm(tile)  # doctest: +SKIP
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        io: int = 240,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue_pixels: int = DEFAULT_MIN_TISSUE_PIXELS,
        min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
    ) -> None:
        _check_params(io, alpha, beta, min_tissue_pixels, min_tissue_fraction)
        reference = _check_rgb(reference, "reference")
        self.io, self.alpha, self.beta, self.min_tissue_pixels = int(io), float(alpha), float(beta), min_tissue_pixels
        self.min_tissue_fraction = float(min_tissue_fraction)
        od = tissue_od(reference, io=self.io, beta=self.beta)
        if not self._enough(len(od), reference):
            raise ValueError(
                f"reference has too little tissue to fit stain vectors: {len(od)} of"
                f" {reference.shape[0] * reference.shape[1]} pixels have OD >= beta={beta} in every channel,"
                f" fewer than min_tissue_pixels={min_tissue_pixels} or under min_tissue_fraction="
                f"{min_tissue_fraction:g} of them; choose a reference tile that is mostly stained tissue"
            )
        if not spans_plane(od):
            raise ValueError(
                "reference tissue is a single flat colour (its OD pixels lie on a line, or in a round cloud of"
                " noise), so two stain vectors cannot be told apart; choose a reference tile showing both"
                " hematoxylin and eosin"
            )
        try:  # optional (medvision[wsi]): importing this module for the jitter must not need it
            from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
        except ImportError as err:
            raise ImportError(
                f"Macenko stain normalisation needs torchstain: pip install 'medvision[wsi]' ({err})"
            ) from err
        self._torchstain: NumpyMacenkoNormalizer = NumpyMacenkoNormalizer()
        with np.errstate(invalid="raise", divide="raise"):
            self._torchstain.fit(reference, Io=self.io, alpha=self.alpha, beta=self.beta)
        he, max_c = self.stain_matrix, self.max_concentrations
        if not (np.all(np.isfinite(he)) and np.all(he >= 0) and np.all(np.isfinite(max_c)) and np.all(max_c > 0)):
            raise ValueError(
                f"reference gave an invalid Macenko fit (stain vectors {he.T.round(3).tolist()} must be non-negative"
                f" OD, concentration scale {max_c.round(3).tolist()} positive); choose another reference tile"
            )

    @property
    def stain_matrix(self) -> np.ndarray:
        """(3, 2) reference stain vectors in OD, unit length: column 0 hematoxylin, column 1 eosin."""
        return np.array(self._torchstain.HERef, dtype=np.float64)

    @property
    def max_concentrations(self) -> np.ndarray:
        """(2,) 99th-percentile H and E concentrations of the reference: the scale tiles are mapped to."""
        return np.array(self._torchstain.maxCRef, dtype=np.float64)

    def is_normalisable(self, rgb: np.ndarray) -> bool:
        """Whether ``rgb`` has enough tissue, spanning both stains' plane, for its stain vectors to be estimated."""
        od = tissue_od(_check_rgb(rgb, "image"), io=self.io, beta=self.beta)
        return self._enough(len(od), rgb) and spans_plane(od)

    def _enough(self, n: int, rgb: np.ndarray) -> bool:
        return n >= self.min_tissue_pixels and n >= self.min_tissue_fraction * rgb.shape[0] * rgb.shape[1]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Returns ``rgb`` (RGB uint8, any H x W) normalised to the reference, or an unchanged copy if tissue-poor.

        A tile whose stain estimate fails numerically (a non-finite value) is also returned unchanged:
        the guard above should leave none, and a crash would lose the whole batch.
        """
        if not self.is_normalisable(rgb):
            return rgb.copy()
        try:
            with np.errstate(invalid="raise", divide="raise"):
                out, _, _ = self._torchstain.normalize(rgb, Io=self.io, alpha=self.alpha, beta=self.beta, stains=False)
        except (FloatingPointError, np.linalg.LinAlgError):
            return rgb.copy()
        return np.ascontiguousarray(out, dtype=np.uint8)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


#: OD vectors (rows: hematoxylin, eosin, DAB; columns: R, G, B) from A. C. Ruifrok and D. A. Johnston,
#: "Quantification of histochemical staining by color deconvolution", Anal Quant Cytol Histol 23(4):291-299, 2001
#: (the matrix scikit-image's ``rgb2hed`` uses), scaled to unit length as the paper does. The DAB row completes the
#: basis: on an H&E slide it holds the residual, which a two-row (H, E) basis loses.
RUIFROK_HED = _unit_rows(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
#: Glass brightness of the jitter's OD: with the ``+ 1`` of :func:`optical_density`, white (255) is OD 0 exactly, so
#: scaling a stain leaves glass white (torchstain's 240 would put it at OD -0.06, a little "negative stain").
JITTER_IO = 256.0


def hed_jitter(rgb: np.ndarray, scale: tuple[float, float], shift: tuple[float, float]) -> np.ndarray:
    """Re-stains ``rgb``: each pixel's hematoxylin and eosin concentrations ``c`` become ``scale * c + shift``.

    Tellez et al.'s HED augmentation (D. Tellez et al., IEEE TMI 2018, "Whole-slide mitosis detection in H&E
    breast histology using PHH3 as a reference to train distilled stain-invariant convolutional networks"; Med
    Image Anal 2019, "Quantifying the effects of data augmentation and stain color normalization in convolutional
    neural networks for computational pathology"): deconvolve OD with :data:`RUIFROK_HED`, ``alpha * c + beta``
    per stain, recombine, clip. Tellez jitters the DAB channel too; here it is left alone, because an H&E slide has
    no DAB: that channel is the residual the two stains do not explain, and jittering it would paint a brown stain
    no slide carries. Concentrations are natural-log OD along unit stain vectors, the units of albumentations'
    ``HEStain``, so its ``intensity_scale_range`` and ``intensity_shift_range`` mean the same here. The shift
    applies to every pixel, glass included (a stain batch or scanner tints the background too), as Tellez's does.

    The whole change is one 3 x 3 map of OD space, so scale 1 and shift 0 return the input (exactly for uint8,
    to float rounding for float32), residual included.

    Args:
        rgb: (..., 3) RGB, uint8 or float32 in [0, 1]; the result has the same shape and dtype.
        scale: multipliers of the (hematoxylin, eosin) concentrations, each >= 0.
        shift: OD added to the (hematoxylin, eosin) concentrations.

    Raises:
        ValueError: ``rgb`` is not RGB uint8 / float32 in [0, 1], or ``scale`` / ``shift`` are not two finite
            numbers (scale non-negative).

    Examples:
        >>> tile = np.full((2, 2, 3), (180, 90, 160), np.uint8)
        >>> bool(np.array_equal(hed_jitter(tile, (1.0, 1.0), (0.0, 0.0)), tile))
        True
        >>> bool(hed_jitter(tile, (1.3, 1.0), (0.0, 0.0))[0, 0, 0] < 180)  # more hematoxylin absorbs more red
        True
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype not in (np.uint8, np.float32) or rgb.ndim < 1 or rgb.shape[-1] != 3:
        got = f"dtype {rgb.dtype}, shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"hed_jitter: expected an RGB image (..., 3) of uint8 or float32 in [0, 1], got {got}")
    a, b = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    if a.shape != (2,) or b.shape != (2,) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(a >= 0)):
        raise ValueError(f"hed_jitter: scale and shift must be two finite numbers (H, E), scale >= 0; got {scale}, "
                         f"{shift}")  # fmt: skip
    if rgb.dtype == np.float32:
        if rgb.size and not (float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0):
            raise ValueError(
                f"hed_jitter: float32 images must be in [0, 1], got {float(rgb.min())}..{float(rgb.max())}"
            )
        intensity = rgb * np.float32(255.0)
    else:
        intensity = rgb.astype(np.float32)
    # OD = c @ M with c = OD @ inv(M); c' = c * (a_H, a_E, 1) + (b_H, b_E, 0)  =>  OD' = OD @ stretch + offset
    stretch = np.linalg.inv(RUIFROK_HED) @ np.diag([a[0], a[1], 1.0]) @ RUIFROK_HED
    offset = np.array([b[0], b[1], 0.0]) @ RUIFROK_HED
    od = optical_density(intensity.reshape(-1, 3), JITTER_IO)
    out = intensity_from_od(od @ stretch.astype(np.float32) + offset.astype(np.float32), JITTER_IO)
    out = np.clip(out, 0.0, 255.0).reshape(rgb.shape)
    if rgb.dtype == np.uint8:
        return np.rint(out).astype(np.uint8)
    return out * np.float32(1.0 / 255.0)


def load_reference(path: str | Path) -> np.ndarray:
    """Reads a reference tile as (H, W, 3) RGB uint8; an opaque alpha channel is dropped.

    Stain vectors are fitted on 8-bit intensities (``io`` is on 0-255), so 16-bit or greyscale files
    are refused rather than rescaled: the reference would silently not be the picture its author chose.

    Raises:
        ImageReadError: the file is missing, unreadable, or not an 8-bit RGB image; the message names it.
    """
    path = Path(path)
    img = read_image_raw(path)
    if img.ndim == 3 and img.shape[2] == 4 and img.dtype == np.uint8 and np.all(img[..., 3] == 255):
        img = np.ascontiguousarray(img[..., :3])
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageReadError(
            f"{path}: a stain reference must be an 8-bit RGB image (H, W, 3) uint8, got dtype {img.dtype}"
            f" shape {img.shape}; save the reference tile as an 8-bit RGB PNG or TIFF"
        )
    return img


class StainNormalize(A.ImageOnlyTransform):
    """albumentations step that Macenko-normalises the image to a reference tile; always applied.

    Put it first in a pipeline (before resizing and augmentation). It takes the reference as a path
    string so ``A.to_dict`` / ``A.from_dict`` and pickling carry the recipe's value, not pixels; the
    fit happens at construction, so a bad reference fails when the pipeline is built. Images may be
    uint8 or float32 in [0, 1] (medvision's loaders); float images are quantised to 8 bits, which is
    the depth H&E tiles are scanned at, and come back float32 in [0, 1].

    Args:
        reference: path of the reference tile (PNG, JPEG or TIFF, 8-bit RGB).
        io: see :class:`MacenkoNormalizer`.
        alpha: see :class:`MacenkoNormalizer`.
        beta: see :class:`MacenkoNormalizer`.
        min_tissue_pixels: see :class:`MacenkoNormalizer`.
        min_tissue_fraction: see :class:`MacenkoNormalizer`.
        p: must be 1.0: applying normalisation to a random share of tiles would mix two colour spaces.

    Examples:
        >>> pipeline = A.Compose([StainNormalize("refs/tumour.png"), A.HorizontalFlip()])  # doctest: +SKIP
    """

    class InitSchema(BaseTransformInitSchema):
        reference: str | Path
        io: int = Field(ge=1, le=255)
        alpha: float = Field(gt=0, lt=50)
        beta: float = Field(gt=0)
        min_tissue_pixels: int = Field(ge=MIN_TISSUE_PIXELS_FLOOR)
        min_tissue_fraction: float = Field(ge=0.01, le=1.0)

        @field_validator("p")
        @classmethod
        def _always(cls, value: float) -> float:
            if value != 1.0:
                raise ValueError(f"StainNormalize is preprocessing and is always applied: p must be 1.0, got {value}")
            return value

    def __init__(
        self,
        reference: str | Path,
        io: int = 240,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue_pixels: int = DEFAULT_MIN_TISSUE_PIXELS,
        min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.reference = str(reference)
        self.io, self.alpha, self.beta, self.min_tissue_pixels = io, alpha, beta, min_tissue_pixels
        self.min_tissue_fraction = min_tissue_fraction
        try:
            self.normalizer = MacenkoNormalizer(
                load_reference(self.reference), io=io, alpha=alpha, beta=beta, min_tissue_pixels=min_tissue_pixels,
                min_tissue_fraction=min_tissue_fraction,
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{self.reference}: {err}") from None

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        if img.dtype == np.uint8:
            return self.normalizer(img)
        if img.dtype == np.float32:
            if img.size and not (float(img.min()) >= 0.0 and float(img.max()) <= 1.0):
                raise ValueError(
                    f"StainNormalize: float32 images must be in [0, 1], got {float(img.min())}..{float(img.max())}"
                )
            as_uint8 = np.rint(img * np.float32(255.0)).astype(np.uint8)
            return self.normalizer(as_uint8).astype(np.float32) * np.float32(1.0 / 255.0)
        raise ValueError(f"StainNormalize: expected a uint8 or float32 RGB image, got dtype {img.dtype}")

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("reference", "io", "alpha", "beta", "min_tissue_pixels", "min_tissue_fraction")

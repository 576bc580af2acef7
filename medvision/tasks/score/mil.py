"""The slide unit of scoring for a run trained on cached features (``data.source: slide_features``).

A slide is planned and tiled as the feature cache was (the run's ``mil.json`` holds the extraction's tiling),
its tiles embedded by the same encoder with the same weights (the checkpoint's SHA-256 must match the one the
run was trained on, else nothing is scored) and precision, and the k fold heads each predict the bag; the
slide's probabilities (or continuous prediction) and every tile's attention are the mean over the folds.

Every entry is one row, as for tile-trained runs (:mod:`medvision.tasks.score.slides`), and each scored slide
also gets its tile table (attention per tile), its attention heatmap and its QuPath GeoJSON, written before
its row. The ``mean`` head attends to nothing (every tile weighs the same), so for it these hold each tile's own
output by the head instead (:func:`tile_maps`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medvision.io.files import sha256
from medvision.metrics import softmax
from medvision.models.encoders import PatchEncoder, load_encoder
from medvision.models.mil import MeanMIL, MILHead
from medvision.models.mil_fit import load_mil, predict_mil
from medvision.options import SLIDE_TIMEOUT
from medvision.recipe import SlidesConfig
from medvision.runs import RunError, versions
from medvision.runtime import setup
from medvision.tasks.mil import MIL_RUN
from medvision.tasks.score.job import ScoreSummary, csv_line, one_line, prediction_cells, run_units
from medvision.tasks.score.outputs import PlannedSlide, SlideOutputs, SlideTiles, attention_measure
from medvision.tasks.score.slides import SlideBatches, SlideScan
from medvision.wsi.source import check_stain_reference


def is_mil_run(model: Path) -> bool:
    """Whether ``model`` is a run folder trained on cached slide features."""
    return (model / MIL_RUN).is_file()


class FeatureMILUnit(SlideScan):
    """Slides to tiles to embeddings to the fold heads' mean, one row a slide (see the module docstring)."""

    outputs: SlideOutputs

    def __init__(self, spec: dict[str, Any], encoder: PatchEncoder, heads: list[MILHead],
                 device: torch.device, out: Path, workers: int, timeout: float, batch_size: int,
                 heatmaps: bool, run_id: str = "") -> None:  # fmt: skip
        super().__init__(SlidesConfig.recorded(spec["slides"]), workers, timeout, turns=device.type == "cpu")
        self.spec, self.encoder, self.heads, self.device = spec, encoder.to(device), heads, device
        self.batch_size, self.outputs = batch_size, SlideOutputs(out, heatmaps, run=run_id)
        self.classes: list[str] | None = spec["classes"]
        self.positive: int | None = spec.get("positive_index")
        self.threshold: float | None = spec.get("threshold")
        outputs = ["prediction"] if self.classes is None else ["pred", *[f"prob_{c}" for c in self.classes]]
        calls = ["call_youden"] if self.threshold is not None else []
        self.columns = ["path", "status", "reason", *outputs, *calls, "tiles", "tissue_mm2", "mpp", "mpp_source",
                        "target_mpp", "level"]  # fmt: skip

    def process(self, item: PlannedSlide, tiles: SlideTiles, batches: SlideBatches) -> None:
        assert item.info is not None
        bag = self.encoder.embed(batches, self.device, self.spec.get("precision", "none"))
        outs, attention = [], []
        for head in self.heads:
            logits, weights = predict_mil(head, [bag])
            outs.append(logits[0] if self.classes is None else softmax(logits)[0])
            attention.append(weights[0])
        slide = np.mean(outs, axis=0)
        item.probs = slide
        k = len(self.heads)
        if self.classes is None:
            c = None
            title = f"{item.rel}: prediction {slide[0]:.4g} (mean of {k} fold heads, {len(tiles.coords)} tiles)"
        else:
            c = self.positive if self.positive is not None else int(slide.argmax())
            title = (f"{item.rel}: P({self.classes[c]}) = {slide[c]:.3f} (mean of {k} fold heads, "
                     f"{len(tiles.coords)} tiles)")  # fmt: skip
        measurements, heat = tile_maps(self.heads, bag, np.mean(attention, axis=0), self.classes, c, self.spec["head"])
        self.outputs.write(item, tiles, measurements, None, heat, title)

    def row(self, item: PlannedSlide, seconds: float) -> str:
        n_out = 1 if self.classes is None else 1 + len(self.classes)
        calls = 1 if self.threshold is not None else 0
        target = self.cfg.target_mpp
        if item.status != "ok" or item.probs is None or item.info is None:
            blank = [""] * (n_out + calls)
            return csv_line([item.rel, item.status, one_line(item.reason), *blank, "", "", "", "", target, ""])
        p, info = item.probs, item.info
        if self.classes is None:
            values = [f"{p[0]:.9g}"]
        else:  # the Youden call compares the digits the threshold was chosen on, as image rows do
            points = [("youden", self.threshold)] if self.threshold is not None else []
            values = prediction_cells(p, self.classes, self.positive, points)
        return csv_line([item.rel, "ok", "", *values, info["n_tiles"], f"{info['tissue_mm2']:.3f}",
                         f"{info['mpp']:.6g}", info["mpp_source"], target, info["level"]])  # fmt: skip

    def finish(self, out: Path, table: Path) -> None:
        self.outputs.finish(out, table)

    def provenance(self) -> dict[str, Any]:
        return {"aggregate": f"{self.spec['head']} (mean of {len(self.heads)} fold heads)",
                "slides": self.cfg.model_dump(mode="json"), "threshold": self.threshold}  # fmt: skip


def tile_maps(heads: list[MILHead], bag: np.ndarray, attention: np.ndarray, classes: list[str] | None,
              shown: int | None, kind: str) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, str]]:  # fmt: skip
    """A slide's tile measurements and the heatmap's values (0-1) and label, from the fold heads' mean.

    An attention head: ``attention``, the folds' mean weights, divided by the slide's largest. The ``mean`` head
    (:class:`~medvision.models.mil.MeanMIL`) weighs every tile the same, so its attention says nothing: instead
    each tile's own output by the head, as if the tile were the whole bag (:meth:`MeanMIL.tile_outputs`), the
    folds' mean: ``tile_prob_<class>`` for each class, the map showing class ``shown``; for regression
    ``tile_prediction`` in the target's units, the map spanning the slide's lowest (0) to highest (1).
    """
    k = len(heads)
    if kind != "mean":
        attn = attention_measure(attention)
        return {"attention": attn}, (attn, f"{kind} attention (÷ the slide's max, mean of {k} folds)")
    x = torch.as_tensor(np.asarray(bag, np.float32))
    own = []
    with torch.no_grad():
        for head in cast(list[MeanMIL], heads):  # _fold_heads refused any other kind in a 'mean' run
            head.eval()
            z = head.tile_outputs(x).double().numpy()
            own.append(z if classes is None else softmax(z))
    tile = np.mean(own, axis=0)
    if classes is None:
        pred = tile[:, 0]
        lo, hi = float(np.min(pred)), float(np.max(pred))
        heat = (pred - lo) / (hi - lo) if hi > lo else np.zeros_like(pred)
        return {"tile_prediction": pred}, (heat, f"each tile's own prediction by the mean head, {lo:.4g} (0) to "
                                                 f"{hi:.4g} (1), mean of {k} folds")  # fmt: skip
    assert shown is not None
    label = f"each tile's own P({classes[shown]}) by the mean head (mean of {k} folds)"
    return {f"tile_prob_{c}": tile[:, j] for j, c in enumerate(classes)}, (tile[:, shown], label)


def _fold_heads(run: Path, spec: dict[str, Any]) -> list[MILHead]:
    """The run's fold heads, each checked to have been trained on features of the encoder ``mil.json`` names (a
    head's own record of the encoder's SHA-256, when it has one): a head from another feature cache would score
    embeddings it never saw.

    Raises:
        RunError: a head that cannot be loaded, of another kind than ``mil.json``'s (a mean head in an attention
            run or the reverse), or whose encoder SHA-256 is not ``mil.json``'s.
    """
    heads = []
    for rel in spec["heads"]:
        try:
            head, meta = load_mil(run / rel, 1 if spec["classes"] is None else len(spec["classes"]))
        except (OSError, ValueError) as err:
            raise RunError(f"{run / rel}: fold head cannot be loaded ({err})") from None
        if isinstance(head, MeanMIL) != (spec["head"] == "mean"):  # once here, not as an error row every slide
            raise RunError(
                f"{run / rel}: a {type(head).__name__} fold head in a run whose {MIL_RUN} names head "
                f"{spec['head']!r}: the run mixes heads; retrain it (medvision train --overwrite)"
            )
        own = meta.get("encoder_sha256")
        if own is not None and own != spec["encoder_sha256"]:
            raise RunError(f"{run / rel}: this fold head was trained on features of the encoder with SHA-256 "
                           f"{str(own)[:16]}…, but {run / MIL_RUN} names {str(spec['encoder_sha256'])[:16]}…: the "
                           "run mixes feature caches; retrain it (medvision train --overwrite)")  # fmt: skip
        heads.append(head)
    return heads


def score_mil_slides(folder: Path, run: Path, out: Path, checkpoint: str | Path | None = None,
                     shard: tuple[int, int] = (0, 1), batch_size: int = 32, workers: int = 1,
                     slide_timeout: float = SLIDE_TIMEOUT, heatmaps: bool = True) -> ScoreSummary:  # fmt: skip
    """Scores every slide under ``folder`` with a cross-validated MIL run; see the module docstring.

    ``checkpoint``: the encoder's weights (default: ``$MEDVISION_ENCODER_<NAME>``), checked against the run's.
    """
    spec = json.loads((run / MIL_RUN).read_text())
    _, device = setup("auto")
    encoder, sha = load_encoder(spec["encoder"], checkpoint)
    if sha != spec["encoder_sha256"]:
        raise RunError(f"{run} was trained on {spec['encoder']} features from the checkpoint with SHA-256 "
                       f"{spec['encoder_sha256'][:16]}…; the checkpoint given has {sha[:16]}…: embed with the "
                       "same weights")  # fmt: skip
    check_stain_reference(run / MIL_RUN, SlidesConfig.recorded(spec["slides"]), spec.get("stain_reference_sha256"))
    heads = _fold_heads(run, spec)
    run_id = sha256(run / MIL_RUN, *(run / rel for rel in spec["heads"]))  # the run: its spec and every fold head
    unit = FeatureMILUnit(spec, encoder, heads, device, out, workers, slide_timeout, batch_size, heatmaps,
                          run_id=run_id)  # fmt: skip
    record = {"model_file": str(run / MIL_RUN), "model_sha256": run_id, "encoder": spec["encoder"],
              "encoder_sha256": sha,
              "engine": "torch", "device": str(device), "amp": spec.get("precision", "none"), "versions": versions(),
              "heads": spec["heads"], "operating_points": []}  # fmt: skip
    threads = (torch.get_num_threads() or 1) if device.type == "cpu" else None
    return run_units(folder, out, unit, shard, record, threads)

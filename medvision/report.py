"""What a run leaves behind for people: ``metrics.json``, ``predictions.csv`` and ``report.md``.

Patient identifiers are never written: predictions carry the item id (a relative path or an
``npz:split:index``), the label and the probabilities only.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _clean(value: Any) -> Any:
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n")


def write_predictions(
    path: Path, rows: list[tuple[str, list[str], np.ndarray, np.ndarray]], classes: list[str]
) -> None:
    """One row per image: split, id, true label, predicted label and one probability column per class."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "id", "label", "pred", *[f"prob_{c}" for c in classes]])
        for split, ids, labels, probs in rows:
            preds = probs.argmax(axis=1)
            for item, y, pred, p in zip(ids, labels, preds, probs, strict=True):
                writer.writerow([split, item, classes[int(y)], classes[int(pred)], *[f"{v:.6f}" for v in p]])


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(path: Path, summary: dict[str, Any]) -> None:
    """A short human-readable report: what was trained on what, the headline metrics, the epochs."""
    lines = [
        f"# medvision run `{summary['name']}`",
        "",
        f"- model: `{summary['model']}` ({summary['weights']}), {summary['in_chans']} input channel(s), "
        f"{summary['image_size']} px",
        f"- data: `{summary['data']}` ({summary['source']}), classes: {', '.join(summary['classes'])}",
        f"- split sizes: {', '.join(f'{k} {v}' for k, v in summary['split_sizes'].items())}",
        f"- best epoch: {summary['best_epoch']} by {summary['monitor']}; wall time {summary['seconds']:.0f} s "
        f"on {summary['device']}",
        "",
        "## Metrics (best checkpoint)",
        "",
        "| split | n | AUC | accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for split, m in summary["metrics"].items():
        lines.append(f"| {split} | {m['n']} | {_fmt(m['auc'])} | {_fmt(m['acc'])} |")
    lines += [
        "",
        "AUC is binary, or macro one-vs-rest for more than two classes (as scikit-learn's `roc_auc_score`).",
        "",
    ]
    if summary.get("history"):
        lines += [
            "## Epochs",
            "",
            "| epoch | phase | train loss | val loss | val AUC | val acc | img/s | lr |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for h in summary["history"]:
            lines.append(
                f"| {h['epoch']} | {h['phase']} | {_fmt(h['train_loss'])} | {_fmt(h['val_loss'])} | "
                f"{_fmt(h['val_auc'])} | {_fmt(h['val_acc'])} | {h['train_img_s']:.0f} | {h['lr']:.2e} |"
            )
        lines.append("")
    lines += ["Files: `metrics.json`, `predictions.csv`, `model.safetensors`, `recipe.yaml`, `train.log`.", ""]
    path.write_text("\n".join(lines))

"""What a run leaves behind for people: ``metrics.json``, ``predictions.csv``, ``report.md`` and ``report.html``.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered
twice: as Markdown next to PNGs in ``plots/``, and as one self-contained HTML file with the PNGs
embedded, so it can be mailed or attached to a ticket as a single file.

Patient identifiers are never written: predictions carry the item id (a relative path or an
``npz:split:index``), the label and the probabilities only; patient-level results are aggregates.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from medvision import plots
from medvision.evaluation import Decision, SplitOutputs
from medvision.io.files import atomic_write_text
from medvision.metrics import PROB_DIGITS
from medvision.recipe import EvalConfig

Block = tuple[str, Any]


def _clean(value: Any) -> Any:
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as JSON, written atomically: a kill leaves the old file or the new one, never half of one."""
    atomic_write_text(path, json.dumps(_clean(payload), indent=2) + "\n")


def write_predictions(
    path: Path, rows: list[tuple[str, list[str], np.ndarray, np.ndarray]], classes: list[str]
) -> None:
    """One row per image: split, id, true label, predicted label and one probability column per class.

    Probabilities keep :data:`~medvision.metrics.PROB_DIGITS` significant digits (not 6 decimals), the digits the
    report's metrics were computed on (:meth:`~medvision.evaluation.SplitOutputs.probs`), so an AUC computed from
    this file is the report's."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "id", "label", "pred", *[f"prob_{c}" for c in classes]])
        for split, ids, labels, probs in rows:
            preds = probs.argmax(axis=1)
            for item, y, pred, p in zip(ids, labels, preds, probs, strict=True):
                values = [f"{v:.{PROB_DIGITS}g}" for v in p]
                writer.writerow([split, item, classes[int(y)], classes[int(pred)], *values])


# ------------------------------------------------------------------------------------ formatting


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``n/a`` where nothing was computed, ``undefined`` where the metric has no value on
    this data (NaN: one class present, a class absent from a macro average; the warnings below say which)."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "undefined"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_ci(summary: dict[str, Any], key: str, ci_key: str | None = None) -> str:
    ci = summary.get(ci_key or f"{key}_ci")
    text = _fmt(summary.get(key))
    if ci and all(v is not None and math.isfinite(v) for v in ci):
        text += f" ({ci[0]:.3f}–{ci[1]:.3f})"
    return text


def _ppv_npv_f1(m: dict[str, Any]) -> list[str]:
    return [_fmt(m["ppv"]), _fmt(m["npv"]), _fmt(m["f1"])]


def _rule(op: dict[str, Any]) -> str:
    return "Youden J" if op["rule"] == "youden" else f"{op['rule']} ≥ {op['target']:g}"


# ------------------------------------------------------------------------------------- the blocks


def _one_image_per_patient(clinical: dict[str, Any]) -> bool:
    return all(s.get("images_per_patient") == 1 for s in clinical["patient"].values() if isinstance(s, dict))


def _label(clinical: dict[str, Any], level: str) -> str:
    """How a level is named: image and patient, or tile and slide for whole-slide runs."""
    if clinical.get("unit") == "slide":
        return {"image": "tile", "patient": "slide"}[level]
    return level


#: The split every run chose its checkpoint, temperature and thresholds on (``train`` writes it as ``val``).
SELECTION_SPLIT = "val"
#: How the metrics table names the split that chose the checkpoint, the temperature and the thresholds.
SELECTION_LABEL = "{split} (selection split: optimistic)"


def _metric_rows(clinical: dict[str, Any], selection: str | None = SELECTION_SPLIT) -> list[list[str]]:
    """The metrics table's rows. ``selection`` (the run's validation split, where it is the one evaluated) chose
    the checkpoint, the temperature and the thresholds, so its rows are labelled as optimistic; metrics.json keeps
    the plain split names."""
    rows = []
    levels = ("image",) if _one_image_per_patient(clinical) else ("image", "patient")
    for level in levels:
        for split, s in clinical[level].items():
            if not isinstance(s, dict) or "n" not in s:
                continue
            cal = s.get("calibration", {})
            name = SELECTION_LABEL.format(split=split) if split == selection else split
            rows.append([_label(clinical, level), name, str(s["n"]), _with_ci(s, "auc"), _with_ci(s, "acc"),
                         _at_point(s), _fmt(s.get("balanced_acc")), _fmt(s.get("average_precision")),
                         f"{_fmt(cal.get('ece_before'))} → {_fmt(cal.get('ece_after'))}",
                         _fmt(cal.get("brier_after"))])  # fmt: skip
    return rows


def roc_markers(ops: list[dict[str, Any]], classes: list[str], positive: int | None) -> list[dict[str, Any]]:
    """The operating points as ROC markers. With more than two classes a point is the positive class's one-vs-rest
    (it sits on that class's thin curve, not on the macro average the plot is titled for), and its label says so."""
    vs_rest = f"{classes[positive]} vs rest, " if len(classes) > 2 and positive is not None else ""
    return [{"label": f"{vs_rest}{_rule(op)}", "fpr": 1 - op["specificity"], "tpr": op["sensitivity"]}
            for op in ops if math.isfinite(op["sensitivity"]) and math.isfinite(op["specificity"])]  # fmt: skip


def _at_point(summary: dict[str, Any]) -> str:
    """Accuracy at the first operating point chosen on validation, naming its rule; n/a without one."""
    points = summary.get("operating_points") or []
    if not points:
        return "n/a"
    op = points[0]
    return f"{_with_ci(op, 'accuracy')} at {_rule(op)} (threshold {_fmt(op['threshold'], 3)})"


def ci_note(clinical: dict[str, Any], cfg: EvalConfig) -> str:
    """What the CIs of the metrics table are, and which level's to quote: the image (tile) level's bootstrap draws a
    patient's (slide's) images together, as they are not independent, but weighs each patient by its images."""
    k_text = f" (k = {cfg.top_k})" if cfg.patient_aggregate == "topk" else ""
    cis = (f"CIs: AUC by a stratified bootstrap, {cfg.bootstrap} resamples, seed {cfg.bootstrap_seed}; accuracy, "
           "sensitivity and specificity by Wilson's interval, at the effective sample size the patient bootstrap "
           "tells where patients have several images (metrics.json: ci_methods)."
           if cfg.bootstrap else "No CIs: evaluation.bootstrap is 0.")  # fmt: skip
    text = f"{cis} AUC is binary, or macro one-vs-rest for more than two classes."
    if clinical.get("unit") == "slide":
        how = (
            "an attention-MIL head (ABMIL, Ilse et al. 2018) on the fine-tuned backbone's frozen tile features"
            if cfg.patient_aggregate == "abmil"
            else f"`{cfg.patient_aggregate}`{k_text} of its tile probabilities"
        )
        return (f"{text} Slide level: each slide's probability is {how}. The tile-level CIs resample slides, not "
                "tiles (a slide's tiles are not independent: they are drawn together), and each slide counts as many "
                "times as it has tiles: quote the slide level. Where the manifest names patients, every bootstrap "
                "draws a patient's slides together.")  # fmt: skip
    if _one_image_per_patient(clinical):
        return f"{text} Every patient has one image here, so the patient level equals the image level and is not shown."
    return (f"{text} Patient level: each patient's image probabilities are aggregated by `{cfg.patient_aggregate}`"
            f"{k_text}. The image-level CIs resample patients, not images (a patient's images are not independent: "
            "they are drawn together), and each patient counts as many times as it has images: quote the patient "
            "level.")  # fmt: skip


def calibrated(decision: Decision) -> bool:
    """Whether a temperature was fitted and kept: not when evaluation.calibrate is off (or there was no validation
    split to fit on), nor when T = 1 was kept because the fitted one made the validation ECE worse."""
    cal = decision.calibration or {}
    return bool(cal) and not cal.get("kept_t1")


def temperature_fact(decision: Decision) -> str:
    """How the probabilities were calibrated, and why T = 1 when temperature scaling would have made them worse (the
    report's line, and the training log's)."""
    cal = decision.calibration or {}
    if cal.get("kept_t1"):
        return f"temperature 1 (not calibrated): {cal['kept_t1']}"
    if not calibrated(decision):  # evaluation.calibrate: false (or no validation split to fit on)
        return (f"temperature {decision.temperature:g}: not calibrated (evaluation.calibrate is off, or there was no "
                "validation split to fit on); the reported probabilities are the model's own softmax")  # fmt: skip
    judged = ""
    if "val_ece_after" in cal:
        judged = f"; cross-fitted validation ECE {cal['val_ece_before']:.3f} → {cal['val_ece_after']:.3f}"
    fact = (
        f"temperature {decision.temperature:.3f} (fitted on validation{judged}; the reported probabilities are "
        "calibrated)"
    )
    return f"{fact}. Warning: {cal['at_bound']}" if cal.get("at_bound") else fact


def _operating_point_rows(clinical: dict[str, Any], split: str) -> list[list[str]]:
    rows = []
    for level in ("image",) if _one_image_per_patient(clinical) else ("image", "patient"):
        s = clinical[level].get(split, {})
        for op in s.get("operating_points", []):
            rows.append([_label(clinical, level), _rule(op), _fmt(op["threshold"], 4),
                         _with_ci(op, "sensitivity"), _with_ci(op, "specificity"),
                         *_ppv_npv_f1(op)])  # fmt: skip
    return rows


def _figures(
    out_dir: Path, focus: SplitOutputs, split: str, classes: list[str], clinical: dict[str, Any], decision: Decision,
    history: list[dict[str, Any]], monitor: str | None, best_epoch: int | None, panel: list[tuple[np.ndarray, str]],
    cfg: EvalConfig,
) -> list[Block]:  # fmt: skip
    """Draws the PNGs into ``plots/`` and returns the figure blocks that show them."""
    fig_dir = out_dir / "plots"
    fig_dir.mkdir(exist_ok=True)
    y, p_cal, p_raw = focus.labels, focus.probs(decision.temperature), focus.probs()
    roc_y, roc_p, roc_classes = plots.for_positive(y, p_cal, classes, decision.positive)
    summary = clinical["image"][split]
    ops = summary.get("operating_points", [])
    points = roc_markers(ops, classes, decision.positive)
    blocks: list[Block] = [("h2", f"Figures ({split} split, per image)")]
    band = min(cfg.bootstrap, 200)  # evaluation.bootstrap: 0 turns the band off with the CIs
    plots.plot_roc(fig_dir / "roc.png", roc_y, roc_p, roc_classes, n_resamples=band, seed=cfg.bootstrap_seed,
                   level=cfg.ci_level, points=points, groups=focus.bootstrap_groups("image"))  # fmt: skip
    caption = (f"ROC curve with its {cfg.ci_level:.0%} bootstrap band ({band} resamples, drawn as the image-level "
               "CIs are)") if band else "ROC curve"  # fmt: skip
    blocks.append(("img", ("plots/roc.png", caption + ("; markers are the operating points" if points else ""))))
    plots.plot_pr(fig_dir / "pr.png", roc_y, roc_p, roc_classes)
    blocks.append(("img", ("plots/pr.png", "Precision-recall curve")))
    if ops and decision.positive is not None and ops[0]["confusion_matrix"] is not None:
        pos = classes[decision.positive]
        names = classes if len(classes) == 2 and decision.positive == 1 else [f"not {pos}", pos]
        cm, title = np.asarray(ops[0]["confusion_matrix"]), f"at {_rule(ops[0])} (threshold {ops[0]['threshold']:.3f})"
    else:
        names, cm, title = classes, np.asarray(summary["confusion_matrix"]), "at the arg-max class"
    plots.plot_confusion(fig_dir / "confusion.png", cm, names, title)
    blocks.append(("img", ("plots/confusion.png", f"Confusion matrix {title}")))
    plots.plot_reliability(fig_dir / "reliability.png", y, p_raw, p_cal)
    caption = (f"Reliability before and after temperature scaling (T = {decision.temperature:.3f})"
               if calibrated(decision) else "Reliability (not calibrated: T = 1)")  # fmt: skip
    blocks.append(("img", ("plots/reliability.png", caption)))
    if history:
        plots.plot_training(fig_dir / "training.png", history, monitor, best_epoch)
        kept = "; the star marks the epoch kept" if best_epoch else ""
        blocks.append(("img", ("plots/training.png", f"Training curves; dashed lines mark phase boundaries{kept}")))
    if panel:
        plots.plot_image_grid(fig_dir / "gradcam_errors.png", [img for img, _ in panel], [t for _, t in panel])
        caption = f"Grad-CAM ({cfg.explain_method}) of the most confident errors on {split}"
        blocks.append(("img", ("plots/gradcam_errors.png", caption)))
    return blocks


def build_report(
    out_dir: Path, meta: dict[str, Any], extra: dict[str, Any], clinical: dict[str, Any], focus: SplitOutputs,
    split: str, decision: Decision, panel: list[tuple[np.ndarray, str]], cfg: EvalConfig,
) -> list[Block]:  # fmt: skip
    classes: list[str] = meta["classes"]
    facts = [
        f"model: `{meta['model']}` ({meta.get('weights', '?')}), {meta['in_chans']} input channel(s), "
        f"{meta['image_size']} px",
        f"data: `{meta.get('data', '?')}` ({meta.get('source', '?')}), classes: {', '.join(classes)}",
        f"split sizes: {', '.join(f'{k} {v}' for k, v in meta['split_sizes'].items())}",
        temperature_fact(decision),
    ]
    if cfg.tta:
        cal = calibrated(decision)
        facts.append(f"test-time augmentation: {'calibrated ' if cal else ''}probabilities averaged over the image and "
                     f"its {', '.join(cfg.tta)} ({1 + len(cfg.tta)} views), the "
                     f"{'temperature and ' if cal else ''}thresholds fitted on that average")  # fmt: skip
    protocol = meta.get("protocol", "finetune")
    if protocol != "finetune":
        fit = extra.get("protocol") or {}
        detail = f"C {fit['C']:g} chosen on validation" if "C" in fit else f"k {fit['k']}" if "k" in fit else ""
        facts.append(f"protocol: {protocol} on the frozen backbone's features ({detail}; "
                     f"{fit.get('train_images', '?')} training images)")  # fmt: skip
    if meta.get("train_fraction", 1.0) < 1.0:
        facts.append(f"labels: data.train_fraction {meta['train_fraction']:g} of the training split")
    if extra.get("monitor"):
        facts.append(f"best epoch: {extra['best_epoch']} by {extra['monitor']}; wall time {extra['seconds']:.0f} s "
                     f"on {meta['device']}")  # fmt: skip
    elif "seconds" in extra:
        facts.append(f"wall time {extra['seconds']:.0f} s on {meta['device']}")
    if "run" in extra:
        facts.append(f"evaluated run: `{extra['run']}`")
    if "seen_in_training" in extra:
        facts.append(f"images the run trained or validated on: {extra['seen_in_training']['fact']}")
    level = f"{cfg.ci_level:.0%}"
    header = [
        "level",
        "split",
        "n",
        f"AUC ({level} CI)",
        f"accuracy, argmax ({level} CI)",
        f"accuracy at the validation threshold ({level} CI)"
        if len(classes) == 2 or decision.positive is None
        else f"accuracy of `{classes[decision.positive]}` vs rest at the validation threshold ({level} CI)",
        "balanced acc.",
        "avg. precision",
    ]
    header += ["ECE before → after", "Brier"]
    blocks: list[Block] = [
        ("h1", f"medvision run `{meta['name']}`"),
        ("ul", facts),
        ("h2", "Metrics"),
        ("table", (header, _metric_rows(clinical, meta.get("selection_split", SELECTION_SPLIT)))),
        ("p", ci_note(clinical, cfg)),
    ]
    compare = extra.get("slide_aggregates")
    if compare:
        agg_rows = [[name, str(m["n"]), _with_ci(m, "auc"), _fmt(m["acc"])] for name, m in compare.items()]
        blocks += [
            ("h2", f"Slide-level aggregation compared ({split} split)"),
            ("table", (["aggregation", "slides", f"AUC ({level} CI)", "accuracy"], agg_rows)),
            (
                "p",
                "The same tiles, fine-tuned model and slides; only the tile-to-slide step differs (tile "
                "probabilities calibrated on validation; ABMIL early-stopped on the validation slides).",
            ),
        ]
    op_rows = _operating_point_rows(clinical, split)
    if op_rows and decision.positive is not None:
        how = (
            f"Thresholds on the calibrated probability of `{classes[decision.positive]}`, chosen on the validation "
            f"split and applied unchanged to {split}: Youden J maximises sensitivity + specificity - 1; "
            "`sensitivity ≥ t` has the fewest false alarms among those reaching sensitivity t; `specificity ≥ t` "
            "catches the most cases among those reaching that specificity (where no validation score reaches it, "
            "just above the highest score, calling every case negative, with a warning). Each threshold lies halfway "
            "between the validation score the rule picks and the next lower one: the same validation calls, and a "
            f"case scoring a hair below that score is not called negative on it. On {split} the sensitivity may fall "
            "below t: its CI shows by how much it can."
        )
        op_header = ["level", "rule", "threshold", "sensitivity", "specificity", "PPV", "NPV", "F1"]
        blocks += [("h2", f"Operating points ({split} split)"), ("p", how), ("table", (op_header, op_rows))]
    per_class = clinical["image"][split].get("per_class", {})
    class_rows = [
        [c, _fmt(m["support"], 0), _with_ci(m, "sensitivity"), _with_ci(m, "specificity"), *_ppv_npv_f1(m)]
        for c, m in per_class.items()
    ]
    blocks += [
        ("h2", f"Per class ({split} split, per image, arg-max decision)"),
        ("table", (["class", "support", "sensitivity", "specificity", "PPV", "NPV", "F1"], class_rows)),
    ]
    history = extra.get("history", [])
    blocks += _figures(out_dir, focus, split, classes, clinical, decision, history, extra.get("monitor"),
                       extra.get("best_epoch"), panel, cfg)  # fmt: skip
    if history:
        blocks += [("h2", "Epochs"), ("table", (
            ["epoch", "phase", "train loss", "val loss", "val AUC", "val acc", "img/s", "lr"],
            [[str(h["epoch"]), h["phase"], _fmt(h["train_loss"], 4), _fmt(h["val_loss"], 4), _fmt(h["val_auc"], 4),
              _fmt(h["val_acc"], 4), f"{h['train_img_s']:.0f}", f"{h['lr']:.2e}"] for h in history]))]  # fmt: skip
    warned = sorted({w for lv in ("image", "patient") for s in clinical[lv].values() if isinstance(s, dict)
                     for w in s.get("warnings", [])})  # fmt: skip
    left_out = (extra.get("data_audit") or {}).get("errors", 0)
    if left_out:
        listed = "; `data_audit.csv` names each with its reason" if (out_dir / "data_audit.csv").is_file() else ""
        warned.insert(0, f"{left_out} unreadable image file(s) were left out of the data (data.on_error: skip)"
                         f"{listed}")  # fmt: skip
    if (decision.calibration or {}).get("at_bound"):
        warned.insert(0, f"calibration: {decision.calibration['at_bound']}")
    if warned:
        blocks += [("h2", "Warnings"), ("ul", warned)]
    blocks.append(("p", "Files: `metrics.json` (everything above, at image and patient level), `predictions.csv`, "
                        "`plots/`, `report.html`."))  # fmt: skip
    return blocks


# ------------------------------------------------------------------------------------- rendering


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for kind, body in blocks:
        if kind in ("h1", "h2"):
            lines += [f"{'#' * int(kind[1])} {body}", ""]
        elif kind == "p":
            lines += [body, ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in body] + [""]
        elif kind == "table":
            header, rows = body
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            path, caption = body
            lines += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:0 1em 1em 0;"
    "vertical-align:top}figcaption{font-size:.85em;color:#555;max-width:520px}img{max-width:100%}"
)


def to_html(blocks: list[Block], base: Path) -> str:
    """Self-contained HTML: every figure is embedded as a base64 PNG."""
    title = next((body for kind, body in blocks if kind == "h1"), "medvision report").replace("`", "")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]  # fmt: skip
    for kind, body in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline(body)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(body)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in body) + "</ul>")
        elif kind == "table":
            header, rows = body
            parts.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                         + "</table>")  # fmt: skip
        elif kind == "img":
            path, caption = body
            data = base64.b64encode((base / path).read_bytes()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{_inline(caption)}</figcaption></figure>")  # fmt: skip
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(
    out_dir: Path, meta: dict[str, Any], extra: dict[str, Any], clinical: dict[str, Any], focus: SplitOutputs,
    split: str, decision: Decision, panel: list[tuple[np.ndarray, str]], cfg: EvalConfig,
) -> None:  # fmt: skip
    """``report.md`` (with ``plots/*.png``) and the self-contained ``report.html`` of one run or evaluation."""
    blocks = build_report(out_dir, meta, extra, clinical, focus, split, decision, panel, cfg)
    (out_dir / "report.md").write_text(to_markdown(blocks))
    (out_dir / "report.html").write_text(to_html(blocks, out_dir))

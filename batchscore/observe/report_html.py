"""The run report as one self-contained HTML page: inline SVG charts and CSS, no script, no
network, so it opens from an e-mail attachment or an air-gapped bucket as well as anywhere.

Read at a glance, top to bottom: is the output committed (or held for drift), how many rows were
scored or set aside and why, what the scores look like, which columns drifted, and each feature.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

#: Colours the page's charts are drawn in (a test finds them in a screenshot).
BAR = "#2563eb"
SPARK = "#0d9488"
WARN = "#d97706"
FAIL = "#dc2626"
OK = "#16a34a"


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    magnitude = abs(value)
    if magnitude and (magnitude >= 1e6 or magnitude < 1e-3):
        return f"{value:.3g}"
    return f"{value:,.4g}" if magnitude < 1000 else f"{value:,.1f}"


def _e(text: Any) -> str:
    return html.escape(str(text))


def histogram_svg(
    histogram: Mapping[str, Sequence[Any]], width: int = 520, height: int = 180, colour: str = BAR, axes: bool = True
) -> str:
    """Bars on their real edges (widths follow the edges), with the range and tallest count labelled."""
    edges, counts = list(histogram.get("edges") or []), list(histogram.get("counts") or [])
    if not counts:
        return '<span class="muted">no values</span>'
    pad_left, pad_bottom, pad_top = (44, 20, 6) if axes else (0, 0, 0)
    plot_w, plot_h = width - pad_left - (6 if axes else 0), height - pad_bottom - pad_top
    low, high = edges[0], edges[-1]
    span = (high - low) or 1.0
    top = max(counts) or 1
    bars = []
    for i, count in enumerate(counts):
        x0 = pad_left + (edges[i] - low) / span * plot_w
        x1 = pad_left + (edges[i + 1] - low) / span * plot_w
        h = count / top * plot_h
        bars.append(
            f'<rect x="{x0:.2f}" y="{pad_top + plot_h - h:.2f}" width="{max(x1 - x0 - 1, 1):.2f}" '
            f'height="{h:.2f}" fill="{colour}"><title>[{_number(edges[i])}, {_number(edges[i + 1])}): '
            f"{count:,}</title></rect>"
        )
    labels = ""
    if axes:
        base = pad_top + plot_h
        labels = (
            f'<line x1="{pad_left}" y1="{base}" x2="{pad_left + plot_w}" y2="{base}" stroke="#555"/>'
            f'<text x="{pad_left}" y="{height - 4}" class="axis">{_e(_number(low))}</text>'
            f'<text x="{pad_left + plot_w}" y="{height - 4}" class="axis" text-anchor="end">'
            f"{_e(_number(high))}</text>"
            f'<text x="{pad_left - 4}" y="{pad_top + 10}" class="axis" text-anchor="end">{top:,}</text>'
            f'<text x="{pad_left - 4}" y="{base}" class="axis" text-anchor="end">0</text>'
        )
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(bars)}{labels}</svg>'
    )


def classes_svg(classes: Mapping[str, int], width: int = 520) -> str:
    """One horizontal bar per predicted class, with its count and share."""
    total = sum(classes.values()) or 1
    top = max(classes.values(), default=1) or 1
    rows = []
    for i, (label, count) in enumerate(sorted(classes.items(), key=lambda kv: -kv[1])):
        y = 4 + i * 24
        w = count / top * (width - 230)
        rows.append(
            f'<text x="0" y="{y + 14}" class="axis">{_e(label)[:18]}</text>'
            f'<rect x="120" y="{y}" width="{max(w, 1):.2f}" height="18" fill="{BAR}"/>'
            f'<text x="{126 + w:.2f}" y="{y + 14}" class="axis">{count:,} ({count / total:.1%})</text>'
        )
    height = 8 + 24 * len(classes)
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(rows)}</svg>'


def _status(report: Mapping[str, Any]) -> tuple[str, str]:
    if report.get("held"):
        return "held for drift: not committed", FAIL
    if report.get("committed") is False:
        return "not committed (no _SUCCESS)", WARN
    return "committed", OK


def _drift_rows(drift: Mapping[str, Any]) -> str:
    rows = []
    for column in sorted(drift["columns"], key=lambda c: -c["psi"]):
        psi = column["psi"]
        fail = drift.get("fail")
        colour = FAIL if fail is not None and psi > fail else WARN if psi > drift["warn"] else OK
        word = "above fail" if colour == FAIL else "drifted" if colour == WARN else "stable"
        rows.append(
            f"<tr><td>{_e(column['column'])}</td><td>{_e(column['kind'])}</td>"
            f'<td class="num">{psi:.4f}</td><td class="num">{_e(_number(column["wasserstein"]))}</td>'
            f'<td><span class="dot" style="background:{colour}"></span>{word}</td></tr>'
        )
    return "".join(rows)


def _drift_section(report: Mapping[str, Any]) -> str:
    drift = report.get("drift")
    if not drift:
        return (
            '<h2>Drift</h2><p class="muted">No reference was given (<code>--reference</code>), or it had no report.</p>'
        )
    thresholds = f"warn above PSI {drift['warn']}" + (
        f", fail above {drift['fail']}" if drift.get("fail") is not None else ""
    )
    accepted = f"; accepted {_e(drift['accepted_at'])}" if drift.get("accepted_at") else ""
    missing = (
        f'<p class="muted">Not in the reference: {_e(", ".join(drift["not_in_reference"]))}</p>'
        if drift.get("not_in_reference")
        else ""
    )
    return (
        f"<h2>Drift</h2><p>Against <code>{_e(drift['reference'])}</code> ({thresholds}{accepted}). "
        f"Largest PSI {_e(_number(drift['max_psi']))} in <b>{_e(drift['max_psi_column'])}</b>.</p>"
        f"<table><tr><th>column</th><th>kind</th><th>PSI</th><th>Wasserstein</th><th></th></tr>"
        f"{_drift_rows(drift)}</table>{missing}"
    )


#: The agreement measures as the page heads them, in the report's order.
AGREEMENT_HEADS = {
    "class_agreement": "class agreement",
    "abs_delta_mean": "|Δ| mean",
    "abs_delta_p95": "|Δ| p95",
    "abs_delta_max": "|Δ| max",
    "spearman": "Spearman",
    "psi": "PSI",
    "top1_overlap": "top 1% overlap",
}


def _challengers_section(report: Mapping[str, Any]) -> str:
    """One row per challenger: its agreement with the champion, or why it failed."""
    challengers = report.get("challengers") or []
    if not challengers:
        return ""
    rows = []
    for c in challengers:
        agreement = c.get("agreement") or {}
        colour, word = (OK, "ok") if c["status"] == "ok" else (FAIL, "failed")
        cells = "".join(f'<td class="num">{_e(_number(agreement.get(key)))}</td>' for key in AGREEMENT_HEADS)
        rows.append(
            f"<tr><td>{_e(c['name'])}</td><td>{_e(c.get('model_version'))}</td>"
            f'<td><span class="dot" style="background:{colour}"></span>{word}</td>'
            f'<td class="num">{_e(_number(agreement.get("rows_compared")))}</td>{cells}</tr>'
        )
        if c.get("error"):
            rows.append(
                f'<tr><td></td><td colspan="{len(AGREEMENT_HEADS) + 3}" class="muted">{_e(c["error"])}</td></tr>'
            )
    heads = "".join(f"<th>{_e(head)}</th>" for head in AGREEMENT_HEADS.values())
    return (
        "<h2>Challengers</h2><p>Each challenger against the champion, on the rows both scored.</p>"
        f"<table><tr><th>challenger</th><th>version</th><th>status</th><th>rows</th>{heads}</tr>{''.join(rows)}</table>"
        f'<p class="muted">{_e(challengers[0].get("accuracy", ""))}</p>'
    )


def _feature_rows(report: Mapping[str, Any]) -> str:
    psi = {c["column"]: c["psi"] for c in (report.get("drift") or {}).get("columns", []) if c["kind"] == "feature"}
    rows = []
    for name, column in report["features"].items():
        q = column.get("quantiles") or {}
        missing = column["nulls"] + column["nan"] + column["inf"]
        rows.append(
            f'<tr><td><b>{_e(name)}</b></td><td class="num">{column["count"]:,}</td>'
            f'<td class="num{" bad" if missing else ""}">{missing:,}</td>'
            + "".join(
                f'<td class="num">{_e(_number(v))}</td>'
                for v in (column["min"], q.get("p05"), q.get("p50"), column["mean"], q.get("p95"), column["max"])
            )
            + f'<td class="num">{_e(_number(psi.get(name)))}</td>'
            f"<td>{histogram_svg(column.get('histogram') or {}, 160, 36, SPARK, axes=False)}</td></tr>"
        )
    return "".join(rows)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #111; max-width: 1100px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff; font-weight: 600; }
.cards { display: flex; gap: 12px; margin: 12px 0; } .card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; }
.card b { display: block; font-size: 20px; } table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #e5e5e5; padding: 3px 8px; text-align: left; vertical-align: middle; }
.num { text-align: right; font-variant-numeric: tabular-nums; } .bad { color: #dc2626; font-weight: 600; }
.muted { color: #666; } .axis { font-size: 11px; fill: #333; } code { font-size: 13px; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 6px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 0; } figcaption { font-weight: 600; }
"""


def render(report: Mapping[str, Any]) -> str:
    """The whole page."""
    status, colour = _status(report)
    rows = report["rows"]
    reasons = rows.get("invalid_by_reason") or {}
    reason_text = (
        ", ".join(f"{_e(k)}: {v:,}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) if reasons else ""
    )
    scores = report["scores"]
    charts = [
        f"<figure><figcaption>{_e(name)}</figcaption>{histogram_svg(column.get('histogram') or {})}"
        f'<div class="muted">mean {_e(_number(column["mean"]))}, median '
        f"{_e(_number((column.get('quantiles') or {}).get('p50')))}</div></figure>"
        for name, column in scores["columns"].items()
    ]
    if scores.get("classes"):
        charts.append(
            f"<figure><figcaption>predicted classes ({_e(scores['class_column'])})</figcaption>"
            f"{classes_svg(scores['classes'])}</figure>"
        )
    profiled = report.get("profiled", True)
    features = (
        f"<table><tr><th>feature</th><th>count</th><th>missing</th><th>min</th><th>p5</th><th>median</th>"
        f"<th>mean</th><th>p95</th><th>max</th><th>PSI</th><th>histogram</th></tr>{_feature_rows(report)}</table>"
        if profiled
        else '<p class="muted">This run was not profiled.</p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>batchscore report: {_e(report["output"])}</title>
<style>{STYLE}</style></head><body>
<h1>batchscore run report <span class="badge" style="background:{colour}">{_e(status)}</span></h1>
<div class="muted"><code>{_e(report["output"])}</code> · model {_e(report.get("model_version"))} ·
plan {_e(report.get("plan_id"))} · predicted at {_e(report.get("predicted_at"))} · report {_e(report.get("created_at"))}</div>
<div class="cards"><div class="card">rows read<b>{rows["read"]:,}</b></div>
<div class="card">scored<b>{rows["scored"]:,}</b></div>
<div class="card">invalid<b class="{"bad" if rows["invalid"] else ""}">{rows["invalid"]:,}</b>{reason_text}</div></div>
<h2>Scores</h2><div class="charts">{"".join(charts) or '<p class="muted">not profiled</p>'}</div>
{_drift_section(report)}
{_challengers_section(report)}
<h2>Features</h2>{features}
<p class="muted">{_e(report.get("accuracy", ""))}</p>
</body></html>
"""


def write_html(report: Mapping[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render(report))

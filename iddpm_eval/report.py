"""A readable report of one or more results tables: a section per experiment, figures beside it.

Figures come from two places: a row's ``extra`` may name ``figure`` (a path, or a list of paths,
relative to the results file's folder unless absolute), and PNG files lying in the same folder as
a results file. A PNG beside the table goes to the experiment whose name its file name contains
(the longest such name wins, compared case-insensitively with ``-``, ``_``, ``.`` and spaces
ignored); the rest are shown under "Other figures". Markdown links figures by relative path;
HTML embeds them as base64 ``<img>`` so the file stands alone.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import os
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from iddpm_core.io import atomic_path
from iddpm_core.io import file_sha256
from iddpm_core.provenance import package_version, utc_now
from iddpm_eval.tables import _file_mode, parse_extra, read_results

OTHER = "Other figures"
_IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
               ".gif": "image/gif"}


@dataclasses.dataclass
class Figure:
    path: Path  # absolute
    caption: str


@dataclasses.dataclass
class ReportData:
    """Everything a report shows, independent of the output format."""

    rows: pd.DataFrame  # all tables, in order, with a ``source`` column
    sources: list[tuple[Path, str, int]]  # (path, sha256, rows)
    experiments: list[str]  # in order of first appearance
    figures: dict[str, list[Figure]]  # experiment (or OTHER) -> figures
    missing_figures: list[str]  # figures named in ``extra`` that do not exist


def _key(name: str) -> str:
    return re.sub(r"[-_.\s]+", "", name.lower())


def _figure_paths(extra: dict) -> list[str]:
    fig = extra.get("figure")
    if fig is None:
        return []
    return [str(f) for f in fig] if isinstance(fig, (list, tuple)) else [str(fig)]


def collect(results: Sequence[str | os.PathLike]) -> ReportData:
    """Read the tables and gather the figures that belong to each experiment."""
    if not results:
        raise ValueError("report: give at least one results table")
    frames, sources = [], []
    for p in results:
        p = Path(p)
        df = read_results(p)
        df["source"] = str(p)
        frames.append(df)
        sources.append((p, file_sha256(p), len(df)))
    rows = pd.concat(frames, ignore_index=True)
    experiments = list(dict.fromkeys(rows["experiment"]))
    figures: dict[str, list[Figure]] = {}
    seen: set[Path] = set()
    missing: list[str] = []

    def add(exp: str, path: Path, caption: str) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        figures.setdefault(exp, []).append(Figure(path, caption))

    for r in rows.itertuples(index=False):
        base = Path(r.source).resolve().parent
        for f in _figure_paths(parse_extra(r.extra)):
            path = Path(f) if Path(f).is_absolute() else base / f
            if path.is_file():
                add(r.experiment, path, f"{r.metric}: {Path(f).name}")
            else:
                missing.append(f"{f} (experiment {r.experiment}, metric {r.metric}, table {r.source})")
    by_key = sorted(((_key(e), e) for e in experiments if _key(e)), key=lambda t: -len(t[0]))
    for folder in dict.fromkeys(Path(s).resolve().parent for s, _, _ in sources):
        for png in sorted(folder.glob("*.png")):
            stem = _key(png.stem)
            exp = next((e for k, e in by_key if k in stem), OTHER)
            add(exp, png, png.name)
    return ReportData(rows, sources, experiments, figures, missing)


def _num(v) -> str:
    if v is None or v is pd.NA:
        return ""
    v = float(v)
    return "nan" if math.isnan(v) else f"{v:.6g}"


def _int(v) -> str:
    return "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(int(v))


def _short(v, n=12) -> str:
    return "" if v is None else str(v)[:n]


HEADERS = ["metric", "value", "interval", "n", "mode", "seed", "config", "checkpoint", "weights", "commit", "time",
           "table"]
_ALWAYS = ("metric", "value")


def _table_cells(df: pd.DataFrame, with_source: bool = False) -> tuple[list[str], list[list[str]]]:
    """Headers and display strings for one experiment's rows (hashes shortened to 12 characters).

    Columns empty in every row are left out (metric and value are always shown); ``table`` (the
    results file) only with ``with_source``.
    """
    rows = []
    for r in df.itertuples(index=False):
        ci = "" if pd.isna(r.ci_low) else f"[{_num(r.ci_low)}, {_num(r.ci_high)}]"
        rows.append([r.metric, _num(r.value), ci, _int(r.n), r.mode or "", _int(r.seed), _short(r.config_hash),
                     _short(r.checkpoint_hash), _short(r.weights_sha256), _short(r.git_commit), r.time or "",
                     r.source if with_source else ""])
    keep = [i for i, h in enumerate(HEADERS) if h in _ALWAYS or any(row[i] for row in rows)]
    return [HEADERS[i] for i in keep], [[row[i] for i in keep] for row in rows]


def _provenance_lines(df: pd.DataFrame) -> list[str]:
    lines = []
    for col, label in (("package_version", "iddpm"), ("machine", "machine")):
        vals = [v for v in dict.fromkeys(df[col]) if v is not None]
        if vals:
            lines.append(f"{label}: " + "; ".join(str(v) for v in vals))
    commands = [c for c in dict.fromkeys(parse_extra(e).get("command") for e in df["extra"]) if c]
    if commands:
        lines.append("command: " + " | ".join(commands))
    return lines


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_link(target: Path, out_dir: Path) -> str:
    rel = os.path.relpath(target, out_dir).replace(os.sep, "/")
    return f"<{rel}>" if re.search(r"[\s()<>]", rel) else rel


def _render_markdown(data: ReportData, out_dir: Path, title: str = "Results report") -> str:
    """Markdown text; figure links are relative to ``out_dir`` (the report's folder)."""
    out = [f"# {title}", "", f"Generated {utc_now()} by iddpm {package_version()} from:", ""]
    for p, sha, n in data.sources:
        out.append(f"- `{p}`: {n} rows, sha256 `{sha[:16]}`")
    out.append("")
    sections = data.experiments + ([OTHER] if OTHER in data.figures else [])
    for exp in sections:
        out += [f"## {exp}", ""]
        if exp != OTHER:
            df = data.rows[data.rows["experiment"] == exp]
            headers, body = _table_cells(df, len(data.sources) > 1)
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            for cells in body:
                out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
            out.append("")
            out += [f"- {_md_cell(line)}" for line in _provenance_lines(df)]
            out.append("")
        for fig in data.figures.get(exp, []):
            out += [f"![{_md_cell(fig.caption)}]({_md_link(fig.path, out_dir)})", ""]
    if data.missing_figures:
        out += ["## Figures not found", ""] + [f"- {_md_cell(m)}" for m in data.missing_figures] + [""]
    return "\n".join(out)


_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:90%}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}
.exp{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}.figs img{max-width:480px;display:block}
figure{margin:0 0 1em 0}.prov{font-size:80%;color:#555}code{font-size:90%}"""


def _img_tag(fig: Figure) -> str:
    mime = _IMAGE_MIME.get(fig.path.suffix.lower(), "application/octet-stream")
    b64 = base64.b64encode(fig.path.read_bytes()).decode("ascii")
    cap = html.escape(fig.caption)
    return f'<figure><img alt="{cap}" src="data:{mime};base64,{b64}"><figcaption>{cap}</figcaption></figure>'


def _render_html(data: ReportData, title: str = "Results report") -> str:
    """A standalone HTML page: per experiment its table with the figures beside it (base64)."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           f"<p>Generated {e(utc_now())} by iddpm {e(package_version())} from:</p><ul>"]
    for p, sha, n in data.sources:
        out.append(f"<li><code>{e(str(p))}</code>: {n} rows, sha256 <code>{sha[:16]}</code></li>")
    out.append("</ul>")
    sections = data.experiments + ([OTHER] if OTHER in data.figures else [])
    for exp in sections:
        out.append(f"<section><h2>{e(exp)}</h2><div class='exp'>")
        if exp != OTHER:
            df = data.rows[data.rows["experiment"] == exp]
            headers, body = _table_cells(df, len(data.sources) > 1)
            out.append("<div><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>")
            for cells in body:
                out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
            out.append("</table><div class='prov'>")
            out += [f"<div>{e(line)}</div>" for line in _provenance_lines(df)]
            out.append("</div></div>")
        figs = data.figures.get(exp, [])
        if figs:
            out.append("<div class='figs'>" + "".join(_img_tag(f) for f in figs) + "</div>")
        out.append("</div></section>")
    if data.missing_figures:
        out.append("<h2>Figures not found</h2><ul>" + "".join(f"<li>{e(m)}</li>" for m in data.missing_figures)
                   + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(results: Sequence[str | os.PathLike], output: str | os.PathLike, html_output: bool | None = None,
                 title: str = "Results report") -> Path:
    """Write the report for ``results`` to ``output`` (atomic). HTML when ``html_output`` is true, or
    when it is ``None`` and ``output`` ends in ``.html``/``.htm``; Markdown otherwise."""
    output = Path(output)
    if html_output is None:
        html_output = output.suffix.lower() in (".html", ".htm")
    data = collect(results)
    if html_output:
        text = _render_html(data, title)
    else:
        text = _render_markdown(data, output.resolve().parent, title)
    mode = _file_mode(output)
    with atomic_path(output) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, mode)
    return output

"""Reports: every experiment's rows appear in its own section, figures are linked or embedded."""

from __future__ import annotations

import base64
import html.parser
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from iddpm_eval.cli import main
from iddpm_eval.report import collect, write_report
from iddpm_eval.tables import append_results

PROV = {"package_version": "0.1.0", "git_commit": "0123456789abcdef", "time": "2026-01-01T00:00:00Z",
        "machine": "box"}
ROWS = [
    ("cifar-small", "fid", 12.3456789, dict(ci_low=11.5, ci_high=13.25, n=1000, mode="legacy-tf", seed=1)),
    ("cifar-small", "precision", 0.612, dict(n=1000)),
    ("digits_cunet", "fid", 45.5, dict(mode="clean")),
    ("digits_cunet", "bpd", 1.875, {}),
    ("mnist|pipe", "recall", 0.25, dict(extra={"figure": "figs/recall curve.png"})),
]


def png(path: Path, colour) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 6, 3), colour, np.uint8)).save(path)
    return path.read_bytes()


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "res"
    rows = [{"experiment": e, "metric": m, "value": v, **PROV, **kw} for e, m, v, kw in ROWS]
    append_results(d / "table.csv", rows)
    figs = {
        "cifar": png(d / "fid_vs_step_cifar_small.png", (255, 0, 0)),   # matches "cifar-small" by name
        "digits": png(d / "digits-cunet-samples.png", (0, 255, 0)),    # matches "digits_cunet"
        "other": png(d / "loss.png", (0, 0, 255)),                     # matches nothing
        "extra": png(d / "figs" / "recall curve.png", (9, 9, 9)),      # named by a row's extra.figure
    }
    return d / "table.csv", figs


def sections_md(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_markdown_has_every_row_in_its_section_and_relative_links(results, tmp_path):
    table, _ = results
    out = tmp_path / "out" / "report.md"
    code = CliRunner().invoke(main, ["report", str(table), "-o", str(out)])
    assert code.exit_code == 0, code.output
    text = out.read_text()
    secs = sections_md(text)
    assert list(secs) == ["cifar-small", "digits_cunet", "mnist|pipe", "Other figures"]
    for e, m, v, kw in ROWS:
        body = secs[e]
        line = next(l for l in body.splitlines() if l.startswith(f"| {m} |"))
        assert f"{v:.6g}" in line
        if "ci_low" in kw:
            assert f"[{kw['ci_low']:.6g}, {kw['ci_high']:.6g}]" in line
        for other in set(secs) - {e}:  # the row is not shown under another experiment
            assert not any(l.startswith(f"| {m} | {v:.6g}") for l in secs[other].splitlines())
    # figures: relative links from the report's folder that resolve to the real files
    links = {sec: re.findall(r"!\[[^\]]*\]\(<?([^)>]+)>?\)", body) for sec, body in secs.items()}
    resolve = lambda rel: (out.parent / rel).resolve()  # noqa: E731
    assert [resolve(l).name for l in links["cifar-small"]] == ["fid_vs_step_cifar_small.png"]
    assert [resolve(l).name for l in links["digits_cunet"]] == ["digits-cunet-samples.png"]
    assert [resolve(l).name for l in links["mnist|pipe"]] == ["recall curve.png"]
    assert [resolve(l).name for l in links["Other figures"]] == ["loss.png"]
    assert all(resolve(l).is_file() for ls in links.values() for l in ls)
    assert "| mnist\\|pipe" not in text and "## mnist|pipe" in text  # pipe in a heading is fine, cells escaped


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.section = None
        self.cells: dict[str, list[str]] = {}
        self.imgs: dict[str, list[str]] = {}
        self._in = None

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "td"):
            self._in = tag
        if tag == "img":
            self.imgs.setdefault(self.section, []).append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "h2":
            self.section = data
        elif self._in == "td":
            self.cells.setdefault(self.section, []).append(data)


def test_html_embeds_figures_and_groups_rows(results, tmp_path):
    table, figs = results
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", str(table), "-o", str(out), "--html"])
    assert res.exit_code == 0, res.output
    p = _Collector()
    p.feed(out.read_text())
    for e, m, v, _ in ROWS:
        cells = p.cells[e]
        assert m in cells and f"{v:.6g}" in cells
    decoded = {sec: [base64.b64decode(s.split(",", 1)[1]) for s in srcs] for sec, srcs in p.imgs.items()}
    assert decoded["cifar-small"] == [figs["cifar"]]
    assert decoded["digits_cunet"] == [figs["digits"]]
    assert decoded["mnist|pipe"] == [figs["extra"]]
    assert decoded["Other figures"] == [figs["other"]]
    assert all(s.startswith("data:image/png;base64,") for ss in p.imgs.values() for s in ss)


def test_several_tables_and_missing_figure(tmp_path):
    a, b = tmp_path / "a" / "t.csv", tmp_path / "b" / "t.csv"
    append_results(a, [{"experiment": "one", "metric": "fid", "value": 1.0, **PROV}])
    append_results(b, [{"experiment": "two", "metric": "fid", "value": 2.0, **PROV,
                        "extra": {"figure": ["gone.png"]}}])
    data = collect([a, b])
    assert data.experiments == ["one", "two"] and len(data.rows) == 2
    assert len(data.missing_figures) == 1 and "gone.png" in data.missing_figures[0]
    text = write_report([a, b], tmp_path / "r.md").read_text()
    assert "## one" in text and "## two" in text and "## Figures not found" in text
    secs = sections_md(text)  # with several tables each row names its table
    for sec, value, src in (("one", "1", a), ("two", "2", b)):
        assert any(l.startswith(f"| fid | {value} |") and l.endswith(f"| {src} |") for l in secs[sec].splitlines())


def test_bad_table_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("experiment,metric,value\nx,fid,1\n")
    res = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r.md")])
    assert res.exit_code == 1 and "bad.csv" in res.output and "missing column" in res.output
    assert not (tmp_path / "r.md").exists()
    res = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r.md"), "--html"])
    assert res.exit_code == 2 and "--html" in res.output

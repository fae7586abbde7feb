"""The claims table of all pairings: ``results/missing_u/<pairing>/claims.csv`` (written by each
pairing's experiment, ``python -m benchmarks.missing_u PAIRING``) gathered into
``results/missing_u/claims.csv`` and into the section of ``results/missing_u/README.md`` between the
markers ``<!-- claims:begin -->`` and ``<!-- claims:end -->`` (nothing else of the README changes).

Usage: ``python -m benchmarks.missing_u.claims [--results results/missing_u]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from iddpm_core.io import write_text

PAIRINGS = ("paper", "params", "flops")
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def gather(results: Path) -> list[dict]:
    """Every pairing's claims rows, with the pairing's name first (pairings not run are left out)."""
    rows = []
    for name in PAIRINGS:
        path = results / name / "claims.csv"
        if path.is_file():
            with path.open(newline="") as fh:
                rows += [{"pairing": name, **r} for r in csv.DictReader(fh)]
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| pairing | claim | U-Net | continuous U-Net | measured | holds? |\n|---|---|---|---|---|---|"
    body = [f"| {r['pairing']} | {r['claim']} | {r['unet']} | {r['cunet']} | {r['measured']} | {r['holds']} |"
            for r in rows]
    return "\n".join([head, *body])


def replace_section(text: str, section: str, where: str) -> str:
    """``text`` with the part between the markers replaced by ``section``; the markers must be there."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: expected one {BEGIN} line followed by one {END} line")
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:a] + "\n" + section + "\n" + text[b:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results/missing_u"))
    a = ap.parse_args(argv)
    rows = gather(a.results)
    if not rows:
        sys.exit(f"{a.results}: no <pairing>/claims.csv yet (run python -m benchmarks.missing_u PAIRING first)")
    fields = ["pairing", "claim", "unet", "cunet", "measured", "holds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(a.results / "claims.csv", buf.getvalue())
    readme = a.results / "README.md"
    write_text(readme, replace_section(readme.read_text(), markdown(rows), str(readme)))
    print(a.results / "claims.csv")
    print(readme)


if __name__ == "__main__":
    main()

"""A report's pages: sections of text, plots and tables, written as Markdown and as one
self-contained HTML file (plots embedded), with every table also as CSV."""
from __future__ import annotations

import base64
import dataclasses
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fqtsim.files import markdown_table

MAX_ROWS = 150   # longer tables are cut in the Markdown and HTML (with a note); CSVs are whole


@dataclass
class Section:
    title: str
    text: list = dataclasses.field(default_factory=list)      # paragraphs (Markdown)
    tables: list = dataclasses.field(default_factory=list)    # (name, DataFrame, caption)
    plots: list = dataclasses.field(default_factory=list)     # (file name, caption)
    warnings: list = dataclasses.field(default_factory=list)  # shown first, prominently


def _cell(v) -> str:
    """Numbers for reading: thousands separators, four significant digits below 1,000."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        return str(v)
    if isinstance(v, (int, np.integer)) or abs(v) >= 1000:
        return f"{v:,.0f}"
    return "0" if v == 0 else f"{v:.4g}"


def _shown(name: str, table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows the page shows, and a note saying what was cut and where the rest is."""
    if len(table) <= MAX_ROWS:
        return table, ""
    return table.head(MAX_ROWS), (f"The first {MAX_ROWS:,} of {len(table):,} rows are shown; "
                                  f"the full table is in {name}.csv.")


def _html_table(table: pd.DataFrame) -> str:
    numeric = [pd.api.types.is_numeric_dtype(t) for t in table.dtypes]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = ["<tr>" + "".join(f"<td{' class=n' if n else ''}>{html.escape(_cell(v))}</td>"
                             for v, n in zip(row, numeric)) + "</tr>"
            for row in table.itertuples(index=False)]
    return f"<div class=scroll><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def write(sections: list[Section], out: Path, command: str):
    intro = ("What the gradient quantizers PTQ, PSQ and BHQ cost on the simulated hardware, with "
             "dynamic ranges (written at full width before requantization) and delayed "
             "ranges (fused).")
    md, page = ["# fqtsim overhead report", "", intro, ""], [f"<h1>fqtsim overhead report</h1><p>{html.escape(intro)}</p>"]
    if command:
        md += [f"Regenerate: `{command}`", ""]
        page.append(f"<p>Regenerate: <code>{html.escape(command)}</code></p>")
    for sec in sections:
        md += [f"## {sec.title}", ""]
        page.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.warnings:
            md += [f"> **Warning:** {sec.warnings[0]}", ">", *[f"> - {w}" for w in sec.warnings[1:]], ""]
            items = "".join(f"<li>{html.escape(w)}</li>" for w in sec.warnings[1:])
            page.append(f"<div class=warning><b>Warning:</b> {html.escape(sec.warnings[0])}<ul>{items}</ul></div>")
        for text in sec.text:
            md += [text, ""]
            page.append(f"<p>{html.escape(text)}</p>")
        for name, caption in sec.plots:
            md += [f"![{name}]({name})", "", f"*{caption}*", ""]
            data = base64.b64encode((out / name).read_bytes()).decode()
            page.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        for name, table, caption in sec.tables:
            table.to_csv(out / f"{name}.csv", index=False)
            shown, cut = _shown(name, table)
            md += [f"### {name} ({name}.csv)", "", markdown_table(shown.map(_cell)), caption, ""]
            md += [f"**{cut}**", ""] if cut else []
            page.append(f"<h3>{html.escape(name)} (<a href='{name}.csv'>{name}.csv</a>)</h3>"
                        + _html_table(shown) + f"<p class=caption>{html.escape(caption)}</p>"
                        + (f"<p class=cut>{html.escape(cut)}</p>" if cut else ""))
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>fqtsim report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}img{max-width:100%}"
        "figure{margin:1em 0}figcaption,.caption{font-size:13px;color:#444;font-style:italic}"
        ".scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}td.n{text-align:right}td:first-child{white-space:nowrap}th{background:#f3f3f3;overflow-wrap:anywhere}"
        ".warning{border:2px solid #c00;background:#fff0f0;padding:.5em 1em}.cut{font-weight:bold}"
        "</style></head><body>" + "\n".join(page) + "</body></html>")

"""Cost reports: a terminal table, and Markdown + HTML with charts (cumulative cost, tornado, unit cost)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any


def money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.0f}"


def terminal_table(a: dict[str, Any], labels: dict[str, str]) -> Any:
    """The per-year and cumulative costs, unit costs, NPV and break-even as one rich table."""
    from rich.table import Table

    t = Table(title=f"{a['scenario']}: {a['years']} years")
    t.add_column("")
    for key in ("cloud", "own"):
        t.add_column(labels[key], justify="right")
    for y in range(a["years"] + 1):
        name = "up front" if y == 0 else f"year {y}"
        t.add_row(name, *(money(a["per_year"][k][y]) for k in ("cloud", "own")))
    if a["residual"]["own"]:
        t.add_row("resale value at the end", "-", money(-a["residual"]["own"]))
    t.add_row("total", *(money(a["totals"][k]) for k in ("cloud", "own")), style="bold")
    t.add_row("NPV of costs", *(money(a["npv"][k]) for k in ("cloud", "own")))
    for unit, name in (("usd_per_million_train_tokens", "$ / M training tokens"),
                       ("usd_per_thousand_requests", "$ / 1k requests")):
        vals = [a["unit_costs"][k][unit] for k in ("cloud", "own")]
        if any(v is not None for v in vals):
            t.add_row(name, *("-" if v is None else f"${v:,.3f}" for v in vals))
    return t


def verdict(a: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The answer in sentences, with the numbers behind it."""
    lines = [f"Cheaper over {a['years']} years: {labels[a['cheaper']]} "
             f"(by {money(abs(a['totals']['cloud'] - a['totals']['own']))})."]
    m = a["break_even_month"]
    lines.append(f"Break-even: owning has cost no more than renting from month {m}." if m
                 else "No break-even within the horizon: owning stays costlier.")
    if "break_even_requests_per_year" in a:
        lines.append(f"Owning pays off above {a['break_even_requests_per_year'] / 1e6:,.1f} million requests a year.")
    if "break_even_utilisation" in a:
        lines.append(f"Owning beats renting when the servers are busy more than "
                     f"{a['break_even_utilisation']:.0%} of the time.")
    if a["own"].get("servers"):
        lines.append(f"Fleet: {a['own']['servers']} server(s) for {a['own']['needed_servers']:.2f} needed at the "
                     "planned utilisation.")
    return lines


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def charts(a: dict[str, Any], tornado: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, bytes]:
    """PNG charts: cumulative cost with the crossover, sensitivity tornado, cost per unit by option."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in (("cloud", "tab:blue"), ("own", "tab:orange")):
        ax.plot(range(len(a["curves"][key])), a["curves"][key], label=labels[key], color=color)
    if a["break_even_month"]:
        m = a["break_even_month"]
        ax.axvline(m, color="grey", ls="--")
        ax.annotate(f"break-even, month {m}", (m, a["curves"]["own"][m]), xytext=(5, -25),
                    textcoords="offset points")
    ax.set(xlabel="month", ylabel="cumulative cost (USD)", title="Cumulative cost")
    ax.legend()
    out["cumulative.png"] = _png(fig)
    plt.close(fig)

    rows = [r for r in tornado if r["low"] != r["high"]]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
        for i, r in enumerate(reversed(rows)):
            lo, hi = sorted((r["low"], r["high"]))
            ax.barh(i, hi - lo, left=lo, color="tab:purple")
        ax.axvline(rows[0]["base"], color="black")
        ax.set_yticks(range(len(rows)), [r["input"] for r in reversed(rows)])
        ax.set(xlabel="own minus cloud, total (USD); left of the line favours owning", title="Sensitivity (±20%)")
        out["tornado.png"] = _png(fig)
        plt.close(fig)

    units = [(u, n) for u, n in (("usd_per_million_train_tokens", "$ per million training tokens"),
                                 ("usd_per_thousand_requests", "$ per thousand requests"))
             if a["unit_costs"]["cloud"][u] is not None]
    if units:
        fig, axes = plt.subplots(1, len(units), figsize=(4 * len(units), 3.5), squeeze=False)
        for ax, (u, n) in zip(axes[0], units, strict=True):
            ax.bar([labels["cloud"], labels["own"]], [a["unit_costs"][k][u] for k in ("cloud", "own")],
                   color=["tab:blue", "tab:orange"])
            ax.set_title(n)
        out["unit_cost.png"] = _png(fig)
        plt.close(fig)
    return out


def write_reports(a: dict[str, Any], tornado: list[dict[str, Any]], labels: dict[str, str], out_dir: Path) -> Path:
    """report.md (with PNGs beside it) and report.html (charts inline); returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = charts(a, tornado, labels)
    for name, data in images.items():
        (out_dir / name).write_bytes(data)
    rows = [("up front" if y == 0 else f"year {y}", a["per_year"]["cloud"][y], a["per_year"]["own"][y])
            for y in range(a["years"] + 1)]
    rows += [("resale value at the end", 0.0, -a["residual"]["own"])] if a["residual"]["own"] else []
    rows += [("total", a["totals"]["cloud"], a["totals"]["own"]), ("NPV", a["npv"]["cloud"], a["npv"]["own"])]
    md = [f"# {a['scenario']}", "", *verdict(a, labels), "", f"| | {labels['cloud']} | {labels['own']} |",
          "|---|---:|---:|", *(f"| {n} | {money(c)} | {money(o)} |" for n, c, o in rows), ""]
    md += [f"![{name}]({name})" for name in images]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    table = "".join(f"<tr><td>{html.escape(n)}</td><td>{money(c)}</td><td>{money(o)}</td></tr>" for n, c, o in rows)
    imgs = "".join(f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}"></figure>'
                   for n, d in images.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(a['scenario'])}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}
</style></head><body><h1>{html.escape(a['scenario'])}</h1>
{''.join(f'<p>{html.escape(v)}</p>' for v in verdict(a, labels))}
<table><tr><th></th><th>{html.escape(labels['cloud'])}</th><th>{html.escape(labels['own'])}</th></tr>{table}</table>
{imgs}</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path

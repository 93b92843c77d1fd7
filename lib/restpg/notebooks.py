"""Run the Databricks-source SQL notebooks in `notebooks/` locally: every SQL cell through
spark.sql, its result as CSV, and a PNG for cells that declare a chart.

Notebook format (what Databricks exports): first line ``-- Databricks notebook source``, cells
separated by ``-- COMMAND ----------``, markdown cells as ``-- MAGIC %md`` lines. A SQL cell may
declare a chart in a comment line::

    -- chart: bar x=reward_bucket y=n series=iteration facet=task title="Rewards per iteration"

kinds: bar, line, scatter; x and y are required, series (one line / bar group per value), facet (one
panel per value) and title are optional. Statements in one cell are separated by a ``;`` at the end
of a line; the last statement's result is the cell's result.

Catalog and schema are notebook parameters, never written into the SQL: a parameter cell declares
them as Databricks widgets and makes them current, and the queries name tables alone::

    CREATE WIDGET TEXT catalog DEFAULT 'main';
    CREATE WIDGET TEXT schema DEFAULT 'restpg';
    USE CATALOG IDENTIFIER(:catalog);
    USE SCHEMA IDENTIFIER(:schema)

On Databricks the widgets fill the parameters; here `run_notebook(..., params=...)` does (`restpg
notebook run --catalog --schema`), and open-source Spark's missing `USE CATALOG` is done through the
session's catalog API.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

HEADER = "-- Databricks notebook source"
SEPARATOR = "-- COMMAND ----------"
CHART_KINDS = ("bar", "line", "scatter")
_CHART = re.compile(r"^\s*--\s*chart:\s*(\S+)\s*(.*)$")
_WIDGET = re.compile(r"CREATE\s+WIDGET\s+TEXT\s+(\w+)\s+DEFAULT\s+(['\"])([^'\"]*)\2", re.I)
_USE = re.compile(r"USE\s+(CATALOG|SCHEMA)\s+IDENTIFIER\(\s*:(\w+)\s*\)", re.I)


class NotebookError(RuntimeError):
    pass


@dataclass
class Chart:
    kind: str
    x: str
    y: str
    series: str | None = None
    facet: str | None = None
    title: str = ""


@dataclass
class Cell:
    number: int            # 1-based position in the notebook, markdown cells included
    kind: str              # 'sql' | 'parameters' (widgets, USE) | 'markdown' | 'magic' (another %language, not run here)
    text: str              # SQL, or the markdown without the MAGIC prefixes
    chart: Chart | None = None
    title: str = ""
    statements: list = field(default_factory=list)


def parse_chart(line: str) -> Chart | None:
    m = _CHART.match(line)
    if not m:
        return None
    kind, opts = m.group(1), dict(kv.split("=", 1) for kv in shlex.split(m.group(2)) if "=" in kv)
    if kind not in CHART_KINDS:
        raise NotebookError(f"chart kind {kind!r} not one of {CHART_KINDS}: {line.strip()}")
    unknown = set(opts) - {"x", "y", "series", "facet", "title"}
    if unknown or "x" not in opts or "y" not in opts:
        raise NotebookError(f"chart needs x= and y= (optional series=, facet=, title=), got {line.strip()}")
    return Chart(kind, opts["x"], opts["y"], opts.get("series"), opts.get("facet"), opts.get("title", ""))


def _statements(sql: str) -> list[str]:
    parts, current = [], []
    for line in sql.splitlines():
        current.append(line)
        if line.rstrip().endswith(";"):
            parts.append("\n".join(current).rstrip().rstrip(";"))
            current = []
    parts.append("\n".join(current))
    code = [p.strip() for p in parts]
    return [p for p in code if any(ln.strip() and not ln.strip().startswith("--") for ln in p.splitlines())]


def parse_cells(text: str) -> list[Cell]:
    """Split a Databricks SQL notebook into cells (markdown and SQL), with declared charts."""
    lines = text.splitlines()
    if lines and lines[0].strip() == HEADER:
        lines = lines[1:]
    chunks, current = [], []
    for line in lines:
        if line.strip() == SEPARATOR:
            chunks.append(current)
            current = []
        else:
            current.append(line)
    chunks.append(current)
    cells = []
    for chunk in chunks:
        body = "\n".join(chunk).strip("\n")
        if not body.strip():
            continue
        number = len(cells) + 1
        nonblank = [ln for ln in body.splitlines() if ln.strip()]
        if all(ln.lstrip().startswith("-- MAGIC") for ln in nonblank):
            content = "\n".join(re.sub(r"^\s*-- MAGIC ?", "", ln) for ln in body.splitlines())
            kind = "markdown" if content.lstrip().startswith("%md") else "magic"
            cells.append(Cell(number, kind, content))
            continue
        statements = _statements(body)
        if statements and all(_parameter_statement(st) for st in statements):
            cells.append(Cell(number, "parameters", body, statements=statements))
            continue
        chart = next((c for c in map(parse_chart, body.splitlines()) if c), None)
        comments = [ln.strip()[2:].strip() for ln in nonblank
                    if ln.strip().startswith("--") and not _CHART.match(ln)]
        title = (chart.title if chart and chart.title else "") or (comments[0] if comments else "")
        cells.append(Cell(number, "sql", body, chart, title, statements))
    return cells


def _code(statement: str) -> str:
    return "\n".join(ln for ln in statement.splitlines() if not ln.strip().startswith("--")).strip()


def _parameter_statement(statement: str):
    code = _code(statement)
    return _WIDGET.fullmatch(code) or _USE.fullmatch(code)


def _apply_parameters(spark, cell: Cell, params: dict) -> None:
    """Declare widgets (a given parameter wins over the default) and make catalog / schema current."""
    from restpg.catalog import identifier

    for statement in cell.statements:
        code = _code(statement)
        widget = _WIDGET.fullmatch(code)
        if widget:
            params.setdefault(widget.group(1), widget.group(3))
            continue
        level, name = _USE.fullmatch(code).groups()
        if name not in params:
            raise NotebookError(f"cell {cell.number} uses :{name}, which no widget declares and no parameter gives")
        value = identifier(params[name], f"notebook parameter {name}")
        if level.upper() == "CATALOG":
            spark.catalog.setCurrentCatalog(value)
        else:
            spark.catalog.setCurrentDatabase(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "cell"


def draw_chart(pdf, chart: Chart, path) -> str:
    """Draw `chart` from a pandas result with matplotlib (Agg canvas, no pyplot)."""
    from matplotlib.figure import Figure

    missing = [c for c in (chart.x, chart.y, chart.series, chart.facet) if c and c not in pdf.columns]
    if missing:
        raise NotebookError(f"chart refers to columns {missing} not in the result {list(pdf.columns)}")
    facets = list(dict.fromkeys(pdf[chart.facet])) if chart.facet and len(pdf) else [None]
    ncols = min(len(facets), 2)
    nrows = (len(facets) + ncols - 1) // ncols
    fig = Figure(figsize=(6.5 * ncols, 3.8 * nrows), dpi=100)
    for i, facet in enumerate(facets):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        sub = pdf if facet is None else pdf[pdf[chart.facet] == facet]
        _draw_axes(ax, sub, chart)
        if facet is not None:
            ax.set_title(f"{chart.facet} = {facet}", fontsize=9)
    if chart.title:
        fig.suptitle(chart.title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return str(path)


def _draw_axes(ax, pdf, chart: Chart) -> None:
    if pdf.empty:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
        return
    groups = list(pdf.groupby(chart.series, sort=True, dropna=False)) if chart.series else [(None, pdf)]
    if chart.kind == "bar":
        xs = [str(x) for x in dict.fromkeys(pdf[chart.x])]  # order of the SQL result
        width = 0.8 / len(groups)
        for i, (name, g) in enumerate(groups):
            heights = dict(zip(g[chart.x].astype(str), g[chart.y]))
            pos = [j - 0.4 + width * (i + 0.5) for j in range(len(xs))]
            ax.bar(pos, [_num(heights.get(x)) for x in xs], width=width, label=None if name is None else str(name))
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=45 if max(map(len, xs)) > 6 else 0, ha="right" if max(map(len, xs)) > 6 else "center", fontsize=8)
    else:
        for name, g in groups:
            label = None if name is None else str(name)
            if chart.kind == "line":
                ax.plot(list(g[chart.x]), [_num(v) for v in g[chart.y]], marker="o", label=label)
            else:
                ax.scatter(list(g[chart.x]), [_num(v) for v in g[chart.y]], s=14, label=label)
    ax.set_xlabel(chart.x)
    ax.set_ylabel(chart.y)
    if chart.series:
        ax.legend(title=chart.series, fontsize=8)


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def parameters(settings) -> dict:
    """The notebooks' catalog and schema parameters for a profile's tables."""
    from restpg.catalog import namespace

    return dict(zip(("catalog", "schema"), namespace(settings)))


def run_notebook(spark, path, out_dir, params: dict | None = None, max_rows: int = 100_000) -> list[dict]:
    """Execute every SQL cell of the notebook at `path` with `params` (e.g. catalog and schema) in place
    of its widgets; CSV per cell and PNG per declared chart under ``<out_dir>/<notebook>/``; PNGs are
    logged to the active MLflow run, if any. The session's current catalog and schema are restored."""
    previous = spark.catalog.currentCatalog(), spark.catalog.currentDatabase()
    try:
        return _run_cells(spark, Path(path), Path(out_dir), dict(params or {}), max_rows)
    finally:
        spark.catalog.setCurrentCatalog(previous[0])
        spark.catalog.setCurrentDatabase(previous[1])


def _run_cells(spark, path: Path, out_dir: Path, params: dict, max_rows: int) -> list[dict]:
    target = out_dir / path.stem
    target.mkdir(parents=True, exist_ok=True)
    results = []
    for cell in parse_cells(path.read_text()):
        if cell.kind == "parameters":
            _apply_parameters(spark, cell, params)
        if cell.kind != "sql":
            continue
        try:
            df = None
            for statement in cell.statements:
                df = spark.sql(statement)
            pdf = df.limit(max_rows).toPandas() if df is not None else None
        except Exception as e:  # noqa: BLE001 — any Spark error is reported with its cell
            raise NotebookError(f"{path.name} cell {cell.number} failed: {e}\n--- SQL ---\n{cell.text}") from e
        stem = f"{cell.number:02d}_{_slug(cell.title)}"
        entry = {"notebook": path.stem, "cell": cell.number, "title": cell.title, "rows": 0, "csv": None, "png": None}
        if pdf is not None:
            entry["rows"] = len(pdf)
            entry["csv"] = str(target / f"{stem}.csv")
            pdf.to_csv(entry["csv"], index=False)
        if cell.chart is not None and pdf is not None:
            try:
                entry["png"] = draw_chart(pdf, cell.chart, target / f"{stem}.png")
            except NotebookError as e:
                raise NotebookError(f"{path.name} cell {cell.number}: {e}\n--- SQL ---\n{cell.text}") from e
            _log_artifact(entry["png"], f"notebooks/{path.stem}")
        results.append(entry)
    return results


def run_notebooks(spark, notebook_dir, out_dir, params: dict | None = None) -> list[dict]:
    """Every ``*.sql`` notebook in `notebook_dir`, in name order."""
    results = []
    for path in sorted(Path(notebook_dir).glob("*.sql")):
        results += run_notebook(spark, path, out_dir, params)
    return results


def _log_artifact(png: str, artifact_path: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifact(png, artifact_path=artifact_path)

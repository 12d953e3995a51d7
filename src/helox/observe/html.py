"""Self-contained HTML pages of Plotly charts: the run dashboard and the explanations.

A page carries plotly.js inline and each figure as JSON, so it opens from a file with no network
(and stays readable years later). It also states whether it rendered, for headless checks:
once every chart is drawn, `<body>` gets `data-charts-rendered` (charts whose SVG exists) beside
`data-charts-expected`; a script error lands in `data-render-errors`.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

from helox.errors import HeloxError

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 16px 24px; color: #1d232b; background: #fafbfc; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 28px 0 6px;
     border-bottom: 1px solid #d9dee5; padding-bottom: 4px; }
p.note { color: #56606d; margin: 2px 0 8px; }
.hx-chart { background: #fff; border: 1px solid #e3e7ec; border-radius: 6px; margin: 8px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 12px; }
table { border-collapse: collapse; margin: 6px 0 12px; background: #fff; }
th, td { border: 1px solid #e3e7ec; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; } td.num { text-align: right;
     font-variant-numeric: tabular-nums; } code { font-size: 12px; }
.sev-critical { color: #b3261e; font-weight: 600; } .sev-warning { color: #9a6700; }
.sev-info { color: #3b6ea5; }
"""

RENDER_SCRIPT = """
window.addEventListener('error', (e) => {
  const b = document.body;
  b.dataset.renderErrors = (b.dataset.renderErrors || '') + e.message + ';';
});
(function () {
  const figures = JSON.parse(document.getElementById('hx-figures').textContent);
  const ids = Object.keys(figures);
  document.body.dataset.chartsExpected = ids.length;
  const config = {responsive: true, displaylogo: false};
  Promise.all(ids.map((id) => Plotly.newPlot(id, figures[id].data, figures[id].layout, config)))
    .then(() => {
      const drawn = ids.filter((id) => document.getElementById(id).querySelector('svg.main-svg'));
      document.body.dataset.chartsRendered = drawn.length;
    })
    .catch((e) => {
      const b = document.body;
      b.dataset.renderErrors = (b.dataset.renderErrors || '') + String(e) + ';';
    });
})();
"""


@dataclass
class Page:
    """Sections of HTML and the figures their chart divs name, assembled by `render`."""

    title: str
    parts: list[str] = field(default_factory=list)
    figures: dict[str, dict] = field(default_factory=dict)
    sections: list[tuple[str, str]] = field(default_factory=list)
    """(anchor, heading) of each section, for the contents line under the title."""

    def heading(self, text: str, note: str = "") -> None:
        anchor = f"s{len(self.sections)}"
        self.sections.append((anchor, text))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(text)}</h2>')
        if note:
            self.note(note)

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def chart(self, figure, height_px: int = 360) -> str:
        """Add a plotly Figure as a chart div; returns the div (also appended to the page)."""
        chart_id = f"chart-{len(self.figures)}"
        figure.update_layout(height=height_px, margin=dict(l=60, r=20, t=40, b=40),
                             template="plotly_white")
        self.figures[chart_id] = json.loads(figure.to_json())
        div = f'<div class="hx-chart" id="{chart_id}"></div>'
        self.parts.append(div)
        return div

    def grid(self, build) -> None:
        """Charts added inside `build()` are laid out side by side."""
        start = len(self.parts)
        build()
        inner = "".join(self.parts[start:])
        del self.parts[start:]
        self.parts.append(f'<div class="grid">{inner}</div>')

    def table(self, header: list[str], rows: list[list], numeric: set[int] = frozenset(),
              cell_classes: list[str] | None = None) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = []
        for r, row in enumerate(rows):
            row_class = f' class="{cell_classes[r]}"' if cell_classes and cell_classes[r] else ""
            cells = "".join(
                f'<td class="num">{html.escape(str(c))}</td>' if i in numeric
                else f"<td>{html.escape(str(c))}</td>" for i, c in enumerate(row))
            body.append(f"<tr{row_class}>{cells}</tr>")
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
                          "</tbody></table>")

    def render(self) -> str:
        figures_json = json.dumps(self.figures).replace("</", "<\\/")
        contents = " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.sections)
        return "\n".join([
            "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title>", f"<style>{CSS}</style>",
            f"<script>{plotly_js()}</script></head><body>",
            f"<h1>{html.escape(self.title)}</h1>", f'<p class="note">{contents}</p>', *self.parts,
            f'<script type="application/json" id="hx-figures">{figures_json}</script>',
            f"<script>{RENDER_SCRIPT}</script>", "</body></html>"])


def plotly_js() -> str:
    """plotly.js as shipped inside the plotly package (no CDN)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as exc:
        raise HeloxError("HTML reports need the plotly package",
                         hint="pip install plotly (it is a Helox dependency: reinstall Helox)"
                         ) from exc
    return get_plotlyjs()

"""Open a Helox HTML page in headless Chromium with the network cut off: did its charts render?

Uses Debian's `chromium` (`make test` installs it where it can). Pages made by
`helox.observe.html` report on `<body>` how many charts they expected and drew, and any error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
    # No network at view time: every host lookup fails, so a page that needs one breaks.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Rendered:
    charts_expected: int
    charts_rendered: int
    errors: str
    dom: str


def render(page: Path, screenshot: Path | None = None, window_px: tuple[int, int] = (1400, 900),
           budget_ms: int = 20_000, timeout_s: float = 120) -> Rendered:
    """Load `page` from its file; return what its `<body>` says it rendered (after the page's
    scripts ran, within `budget_ms` of virtual time), and write a screenshot if asked."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium on PATH (Debian: apt-get install chromium)")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                  f"--virtual-time-budget={budget_ms}",
                  f"--window-size={window_px[0]},{window_px[1]}"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                             timeout=timeout_s, check=True).stdout
        if screenshot is not None:
            subprocess.run([*common, f"--screenshot={Path(screenshot).resolve()}", url],
                           capture_output=True, timeout=timeout_s, check=True)
    body = re.search(r"<body([^>]*)>", dom)
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1))) if body else {}
    return Rendered(int(attrs.get("charts-expected", -1)), int(attrs.get("charts-rendered", -1)),
                    attrs.get("render-errors", ""), dom)

"""A report page as a real browser shows it: Debian's Chromium, headless, driven by Playwright.

`inspect_page` loads a file at a given viewport width and returns what a reader would meet:
console errors, figures and images that did not render, elements wider than the viewport.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str:
    """The system Chromium (.ci/run installs Debian's `chromium`); skip outside CI without it."""
    for p in (os.environ.get("UNISWEEP_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if p and Path(p).is_file():
            return p
    if os.environ.get("CI"):
        pytest.fail("no Chromium: .ci/run must install Debian's chromium package")
    pytest.skip("no system Chromium (apt-get install chromium)")


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    plotly_divs: int = 0
    plotly_rendered: int = 0
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    too_wide: list[str] = field(default_factory=list)
    scroll_width: int = 0
    viewport_width: int = 0


_CHECK_JS = """() => {
  const vw = document.documentElement.clientWidth;
  const wide = [];
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 0.5 && r.left > -1000) {  // plotly's tester sits at -10000
      wide.push(e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
                (e.className && typeof e.className === 'string' ? '.' + e.className.split(' ')[0] : '') +
                ' ' + Math.round(r.left) + '..' + Math.round(r.right));
    }
  }
  const imgs = Array.from(document.images);
  return {
    plotly_divs: document.querySelectorAll('.plotly-graph-div').length,
    plotly_rendered: Array.from(document.querySelectorAll('.plotly-graph-div'))
      .filter(d => d.querySelector('svg.main-svg') && d.getBoundingClientRect().height > 100)
      .length,
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    too_wide: wide.slice(0, 20),
    scroll_width: document.documentElement.scrollWidth,
    viewport_width: vw,
  };
}"""


def inspect_page(path: Path, *, width: int = 800, height: int = 1000,
                 screenshot: Path | None = None) -> PageReport:
    """Open `path` in headless Chromium at `width` px and check it (see PageReport)."""
    from playwright.sync_api import sync_playwright

    rep = PageReport()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(),
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: rep.console_errors.append(m.text)
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: rep.console_errors.append(f"pageerror: {e}"))
            # Anything fetched from outside the file's folder is a failure: no CDN, no network.
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith("file://")
                       else (rep.console_errors.append(f"network: {route.request.url}"),
                             route.abort())[1])
            page.goto(path.resolve().as_uri(), wait_until="load", timeout=120_000)
            page.wait_for_timeout(500)  # Plotly draws after load
            for key, value in page.evaluate(_CHECK_JS).items():
                setattr(rep, key, value)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return rep

"""Snakemake's report as a person sees it: report.html opened in headless Chromium (Debian's
package, installed by scripts/chromium.sh; Playwright drives it, no browser is downloaded),
a category clicked in the menu, each result's eye button clicked and the picture shown
screenshotted.

Without Chromium (and no root or apt-get to install it) the test is skipped saying why,
except in CI (CI=true, or WSISEG_REQUIRE_CHROMIUM=1 as .ci/run sets), where that is an error.
"""

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

#: this machine has no internet and no GPU for the browser; each run gets a fresh profile
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """Path of Chromium, installed first if it is not there (scripts/chromium.sh)."""
    res = subprocess.run(["bash", str(REPO / "scripts" / "chromium.sh"), "install"], capture_output=True, text=True)
    if res.returncode == 0:
        return res.stdout.strip().splitlines()[-1]
    why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "scripts/chromium.sh install failed"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("WSISEG_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"CI must open the report in Chromium, but: {why}")
    pytest.skip(why)


@dataclass
class Shown:
    """One result of the report as shown: its label(s) in the list, the picture's natural
    size in the browser and the screenshot of it."""

    label: str
    width: int
    height: int
    screenshot: Path

    def pixels(self) -> np.ndarray:
        return np.asarray(Image.open(self.screenshot).convert("RGB"))


def show_category(html: Path, category: str, out_dir: Path) -> list:
    """Open ``html``, click ``category`` in the menu, then each result's eye button in turn;
    every picture shown is screenshotted into ``out_dir`` (also the whole page, once per
    result: page-<i>.png, for a person to look at). Returns a :class:`Shown` per result."""
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    shown = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            errors, fetched = [], []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # self-contained: nothing but the file itself and its data: URIs is asked for
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else fetched.append(r.url))
            page.goto(html.resolve().as_uri())
            page.get_by_text(category, exact=True).click()
            rows = page.locator("nav table tbody tr")
            rows.first.wait_for()
            prev = ""
            for i in range(rows.count()):
                row = rows.nth(i)
                label = " / ".join(t.strip() for t in row.locator("td").all_inner_texts() if t.strip())
                row.locator("a").first.click()  # the eye: show the result
                img = page.locator("div.grow > div.p-3 > img")
                page.wait_for_function(  # the new picture, decoded
                    "(prev) => { const img = document.querySelector('div.grow > div.p-3 > img');"
                    " return img && img.src !== prev && img.complete && img.naturalWidth > 0 }",
                    arg=prev,
                )
                prev = img.get_attribute("src")
                w, h = img.evaluate("el => [el.naturalWidth, el.naturalHeight]")
                shot = out_dir / f"result-{i}.png"
                img.screenshot(path=str(shot))
                page.screenshot(path=str(out_dir / f"page-{i}.png"))
                shown.append(Shown(label=label, width=w, height=h, screenshot=shot))
            assert not errors, f"the report's JavaScript failed: {errors}"
            assert not fetched, f"the report asked for more than itself: {fetched}"
        finally:
            browser.close()
    return shown


def check_not_blank(shot: Shown, min_std: float = 10.0, min_inked: float = 0.01):
    """A picture, not an empty frame: its pixels vary and a share of them is not background."""
    px = shot.pixels().astype(np.float64)
    assert px.shape[0] > 50 and px.shape[1] > 50, (shot.label, px.shape)
    inked = (np.abs(px - px[0, 0]).sum(-1) > 30).mean()  # differs from the corner (background) colour
    assert px.std() > min_std and inked > min_inked, (shot.label, px.std(), inked)

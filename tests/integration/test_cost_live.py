"""Cost against real components: spot prices through boto3 from moto's EC2 server, the HTML report in Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration


def test_live_spot_price_plumbing(moto_server: str) -> None:
    from cost.prices import live_spot_price

    price = live_spot_price("p5.48xlarge", "us-east-1", endpoint_url=moto_server)
    assert price is not None and price >= 0  # moto serves placeholder prices: the plumbing, not the number


def test_no_credentials_falls_back_to_the_catalog(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cost.prices import live_spot_price

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert live_spot_price("p5.48xlarge", "us-east-1") is None


def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by scripts/install-system.sh (make test runs it)"
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "privlm.cli", "cost", "report",
                    str(REPO / "recipes/cost/h100-buy-vs-p5-rent.yaml"), "--out", str(out)], check=True, cwd=REPO)
    page = (out / "report.html").read_text()
    assert page.count('<img alt="') == 3 and "break-even" in page.lower()
    assert {"cumulative.png", "tornado.png", "unit_cost.png", "report.md"} <= {p.name for p in out.iterdir()}
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,2400",
                    f"--screenshot={shot}", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # a rendered page with charts, not a blank one
    colored = (abs(pixels[..., 0] - pixels[..., 2]) > 0.3).mean()
    assert colored > 0.001  # the blue and orange chart lines/bars are on screen

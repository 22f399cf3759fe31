"""``transferlab report``'s HTML in a real headless browser: it renders, every figure decodes, no
JavaScript error. Skips (with the reason) where no chromium is installed (`.ci/run` installs it)."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from orchestrator.cli import main
from tests.synthetic_runs import SyntheticStudy, per_example_frame

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    """A study with every section: two sources, sizes, noise, shots, layers, class subsets."""
    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root}/mlflow.db"
    s = SyntheticStudy(uri, "browser", root / "artifacts")
    rng = np.random.default_rng(0)
    classes = [str(c) for c in range(10)]
    for source, shift in (("mnist", 1.0), ("emnist", 3.0)):
        for size in (1000, 4000, 16000):
            for noise in (0.0, 0.4):
                for seed in range(4):
                    included = rng.permutation(10) < 5 if source == "mnist" else None
                    base = 0.95 - 0.7 * (size * shift * (0.5 if noise else 1.0)) ** -0.25
                    pre = s.pretrain(
                        source,
                        size,
                        upstream=base + rng.normal(0, 0.02),
                        noise=noise,
                        seed=seed,
                        classes=classes,
                        included=None if included is None else included.tolist(),
                    )
                    for shots in (1, 5, "full"):
                        acc = base - {1: 0.2, 5: 0.08, "full": 0.0}[shots] + rng.normal(0, 0.01)
                        p = np.clip(
                            acc + 0.1 * (included[3] if included is not None else 0) + rng.normal(0, 0.05, 30), 0, 1
                        )
                        s.transfer(
                            pre,
                            "digits",
                            shots,
                            0,
                            acc,
                            layer="last" if seed % 2 else "penultimate",
                            per_example=per_example_frame(p) if shots == "full" else None,
                        )
    out = root / "report"
    assert main(["report", "browser", "--tracking-uri", uri, "--out", str(out), "--bootstrap", "20"]) == 0
    return out / "report.html"


def test_report_renders_in_headless_chromium_without_errors(report_html, tmp_path):
    shot = tmp_path / "report.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", report_html.as_uri())
    assert shot.exists() and shot.stat().st_size > 50_000, r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "CONSOLE" not in r.stderr, r.stderr[-2000:]

    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", report_html.as_uri())
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stderr[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    assert (
        int(attrs["images"]) >= 7 and attrs["broken-images"] == "0"
    )  # the page's own load check ran and every PNG decoded
    assert "Uncaught" not in dom.stderr
    assert "Source-class influence" in dom.stdout and "best_layer" in dom.stdout and "data_multiplier" in dom.stdout
    assert "claims_overall" in dom.stdout and "reproduced" in dom.stdout  # the claims the grid admits, judged

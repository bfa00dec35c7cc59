"""End to end: a real run with ParameterMonitor, a real TensorBoard, a real (headless) Chromium.

What a person opening TensorBoard on a monitored run should see:
- Custom Scalars: one chart per shared parameter, holding each use's contribution and the total;
- Text: the parameter table, rendered as an HTML table (not as raw markdown);
- Scalars: sections named after the tag families (``weight_mean``, ``grad_norm``, ...).

The custom-scalars page is saved as a screenshot under the test's tmp dir (set
``PARAM_MONITOR_DASHBOARD_PNG=/some/file.png`` to keep a copy).  The README's picture comes
from a FashionMNIST run instead, which looks more like real training::

    python experiments/shared_mlp.py --trainer.logger.init_args.save_dir /tmp/fm
    python tests/browser_support.py /tmp/fm docs/dashboard.png model.net.3.weight
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    TensorBoardServer,
    chromium,
    open_page,
    requires_browser,
    run_deep_js,
    show_custom_scalars,
    tensorboard_server,
    wait_until,
)

from tests.helpers.trainers import make_trainer

pytestmark = [pytest.mark.browser, pytest.mark.slow, requires_browser]

SHARED = "model.2.weight"  # model.2 is applied twice, as model.2 and model.4
SITES = ("model.2", "model.4")


@dataclass(frozen=True)
class Run:
    logdir: Path  # what tensorboard serves
    name: str  # the run's name in TensorBoard: its directory relative to logdir


def train_tiny_shared_model(save_dir: Path) -> Path:
    """20 steps of a tiny MLP whose middle Linear is used twice, with the monitor on."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn


    class TinyShared(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            shared = nn.Linear(8, 8)
            self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(8, 2))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            loss = nn.functional.cross_entropy(self.model(inputs), targets)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    logger = TensorBoardLogger(str(save_dir), name="tiny")
    trainer = make_trainer(save_dir, max_steps=20, logger=logger)
    trainer.fit(TinyShared(), torch.utils.data.DataLoader(data, batch_size=8))
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    logdir = tmp_path_factory.mktemp("logs")
    run_dir = train_tiny_shared_model(logdir)
    return Run(logdir, run_dir.relative_to(logdir).as_posix())


@pytest.fixture(scope="module")
def server(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    with tensorboard_server(run.logdir, tmp_path_factory.mktemp("tensorboard")) as tb:
        tb.wait_for_data(run.name)
        yield tb


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chromium(1400, 1000) as browser:
        yield browser


# The shared parameter's chart: its total and one contribution per use.
SHARED_CHART_TAGS = sorted([f"grad_norm/{SHARED}"] + [f"shared_grad/{SHARED}/{site}" for site in SITES])


def test_custom_scalars_page_charts_each_use_of_a_shared_parameter_with_its_total(
    run: Run, server: TensorBoardServer, driver: Any, tmp_path: Path
) -> None:
    charts = {chart["title"]: chart for chart in show_custom_scalars(driver, server, feature=SHARED)}
    assert SHARED in charts, f"no chart titled {SHARED!r} among {sorted(charts)}"
    # the legend names each series "tag (run)"
    assert sorted(charts[SHARED]["series"]) == [f"{tag} ({run.name})" for tag in SHARED_CHART_TAGS]
    assert charts[SHARED]["drawn_lines"] >= 3
    model_charts = {"gradient norms", "weight norms", "weight means"}
    assert model_charts | {"shared gradient error", "shared gradient cosine"} <= charts.keys()
    save_screenshot(driver, tmp_path / "dashboard.png")


def test_custom_scalars_data_api_serves_the_shared_chart_tags(run: Run, server: TensorBoardServer) -> None:
    """The same chart through TensorBoard's data API: what the frontend fetched to draw it."""
    layout = server.get_json("/data/plugin/custom_scalars/layout")
    (category,) = layout["category"]
    (regex,) = next(c["multiline"]["tag"] for c in category["chart"] if c["title"] == SHARED)
    query = urllib.parse.urlencode({"run": run.name, "tag": regex})
    payload = server.get_json(f"/data/plugin/custom_scalars/scalars?{query}")
    assert payload["regex_valid"]
    assert sorted(payload["tag_to_events"]) == SHARED_CHART_TAGS
    assert all(len(points) == 20 for points in payload["tag_to_events"].values())


TABLES_JS = """
const dash = deepFind(document, 'tf-text-dashboard')[0];
if (!dash) return null;
// The text plugin wraps each text in a table of its own: keep the tables with a header row.
return deepFind(dash, 'table')
  .filter((t) => t.querySelector(':scope > thead > tr > th'))
  .map((t) => ({
    headers: Array.from(t.querySelectorAll(':scope > thead > tr > th')).map(text),
    rows: Array.from(t.querySelectorAll(':scope > tbody > tr')).map((r) => Array.from(r.cells).map(text)),
  }));
"""


def test_text_page_renders_the_parameter_table_as_html(server: TensorBoardServer, driver: Any) -> None:
    open_page(driver, server, "text", "tf-text-dashboard")
    tables = wait_for(driver, TABLES_JS, "the parameter table on the Text page")
    (table,) = tables
    assert table["headers"][:2] == ["name", "shape"]
    rows = {row[0]: row for row in table["rows"]}
    assert SHARED in rows
    assert all(site in rows[SHARED][table["headers"].index("call sites")] for site in SITES)
    assert "|" not in "".join(rows[SHARED]), "markdown was shown as text, not rendered"


SCALAR_SECTIONS_JS = """
const dash = deepFind(document, 'tf-scalar-dashboard')[0];
if (!dash) return null;
return deepFind(dash, 'tf-category-paginated-view')
  .map((view) => view.shadowRoot && view.shadowRoot.querySelector('.category-name'))
  .filter((name) => name).map(text);
"""


def test_scalars_page_groups_tags_into_one_section_per_family(server: TensorBoardServer, driver: Any) -> None:
    open_page(driver, server, "scalars", "tf-scalar-dashboard")
    sections = wait_for(driver, SCALAR_SECTIONS_JS, "the Scalars page's sections")
    for family in ("weight_mean", "weight_norm", "grad_norm", "shared_grad", "grad_norm_total"):
        assert family in sections, f"no {family!r} section among {sections}"


def wait_for(driver: Any, script: str, what: str, timeout: float = 30) -> Any:
    """Re-run ``script`` in the page until it returns something non-empty."""
    return wait_until(lambda: run_deep_js(driver, script), timeout, what)


def save_screenshot(driver: Any, path: Path) -> None:
    """Save the page as PNG, check it is a real picture, and keep a copy where asked."""
    driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000, "screenshot is empty"
    keep = os.environ.get("PARAM_MONITOR_DASHBOARD_PNG")
    if keep:
        shutil.copyfile(path, keep)

"""The MLflow UI on a sweep, in headless Chromium: the README's "compare the variants" steps, for real.

A sweep is written to MLflow with the sweep's own logging helpers (parent run, one child per variant,
comparison artifacts; no Ray: the real 4-trial sweep is test_sweep.py), an ``mlflow server`` serves it
on 127.0.0.1, and Debian's chromium, driven by playwright-core (node), does what the README's dashboard
section says: opens the experiments list, switches MLflow 3's sidebar from "GenAI" to "Model training",
clicks the experiment (which opens on its runs table, not on a GenAI traces overview), expands the
parent, shows the metric columns, and opens the compare view. A screenshot of each step is written to
the test's folder, or to ``docs/`` (the README's pictures) with ``VID2VID_UPDATE_DOCS=1``. Needs
``chromium`` and ``playwright-core``; ``make test`` installs both (see the Makefile's browser block),
otherwise skips.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vid2vid.platform.compare import TrialRecord
from vid2vid.platform.sweep import VARIANTS, TrialSpec, log_trial_identity, parent_tags, trial_tags, write_comparison
from vid2vid.platform.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
PLAYWRIGHT = Path(os.environ.get("VID2VID_PLAYWRIGHT", REPO / ".venv" / "browser" / "node_modules" / "playwright-core"))
CHROMIUM = os.environ.get("VID2VID_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
METRICS = ["random_weights/eval/fid_i3d", "params/generator", "params/discriminator"]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs Debian's chromium; "
                                                "or set VID2VID_CHROMIUM=/path/to/chromium)"),
    pytest.mark.skipif(shutil.which("node") is None or not (PLAYWRIGHT / "package.json").is_file(),
                       reason=f"node or playwright-core missing at {PLAYWRIGHT} (make test runs `npm install "
                              f"--prefix .venv/browser playwright-core`; or set VID2VID_PLAYWRIGHT)"),
]

# The browser side: what a user does in the UI, reported as JSON for the assertions in Python.
SCRIPT = r"""
const { chromium } = require(process.env.PLAYWRIGHT);
const [base, expName, parentName, compareUrl] = process.argv.slice(2);
const shot = name => page.screenshot({path: `${process.env.SHOTS}/mlflow-${name}.png`});
let page;
(async () => {
  const ctx = await chromium.launchPersistentContext(process.env.USER_DATA_DIR, {
    executablePath: process.env.CHROMIUM, headless: true, viewport: {width: 2400, height: 1400},
    args: JSON.parse(process.env.FLAGS)});
  // Only 127.0.0.1: anything else (fonts, telemetry) is refused and recorded.
  const blocked = [];
  await ctx.route('**/*', r => {
    const host = new URL(r.request().url()).hostname;
    if (host === '127.0.0.1' || r.request().url().startsWith('data:')) return r.continue();
    blocked.push(host); return r.abort();
  });
  page = ctx.pages()[0] || await ctx.newPage();
  page.setDefaultTimeout(60000);
  // the home page lists the experiments. MLflow 3.17 opens in its GenAI mode, where an experiment opens
  // on a traces overview: "Model training" at the top of the sidebar (kept by the browser) shows runs
  await page.goto(`${base}/`, {waitUntil: 'load'});
  const experiment = page.getByRole('link', {name: expName, exact: true}).first();
  await experiment.waitFor();
  await page.getByText('Model training', {exact: true}).first().click();
  await shot('1-experiments');
  await experiment.click();
  const parent = page.getByRole('link', {name: parentName, exact: true});
  await parent.waitFor();
  const landed = page.url();
  await shot('2-runs');
  // children are nested under the parent: expand it, then show every metric column
  await page.locator('[role=row]', {has: parent}).locator('button[data-component-id*="runnamecellrenderer"]').click();
  await page.getByRole('link', {name: `${parentName}-full-s0`}).waitFor();
  await page.getByTestId('column-selection-dropdown').first().click();
  await page.getByText(/^Metrics \(\d+\)$/).click();
  await page.keyboard.press('Escape');
  await page.getByRole('columnheader', {name: process.env.FIRST_METRIC}).first().waitFor();
  await shot('3-children-and-metrics');
  const table = await page.evaluate(() => {
    const headers = Array.from(document.querySelectorAll('[role=columnheader]'))
      .map(h => h.innerText.trim()).filter(Boolean);
    const rows = {};  // ag-grid splits a row into pinned and scrolling parts: join them by row-index
    for (const r of document.querySelectorAll('[role=row][row-index]')) {
      const i = r.getAttribute('row-index');
      rows[i] = ((rows[i] || '') + ' ' + r.innerText.replace(/\s+/g, ' ')).trim();
    }
    return {headers, rows: Object.values(rows)};
  });
  await page.goto(`${base}/${compareUrl}`, {waitUntil: 'load'});
  await page.getByText(/Comparing \d+ Runs/).waitFor();
  await page.getByText('Run details').waitFor();
  await shot('4-compare');
  const compare = await page.evaluate(() => document.body.innerText);
  console.log(JSON.stringify({table, compare, blocked, landed}));
  await ctx.close();
})().catch(e => { console.error(e); process.exit(1); });
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_sweep(root: Path) -> tuple[str, str, dict[str, str], str]:
    """A finished 4-variant sweep in a SQLite store, logged by the sweep's own helpers."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    name = "abl"
    parent = Tracker(uri, "sweep-ui", run_name=name, run_dir=root, tags=parent_tags(name, "smoke", "test sweep"))
    children, records = {}, []
    for i, variant in enumerate(VARIANTS):
        spec = TrialSpec(variant, 0)
        child = Tracker(uri, "sweep-ui", run_name=f"{name}-{spec.label}", run_dir=root,
                        tags={**trial_tags(name, spec), "mlflow.parentRunId": parent.run_id})
        counts = {"params/generator": 1000 - 100 * i, "params/discriminator": 500 - 10 * i}
        log_trial_identity(child, spec, counts)
        metrics = {"random_weights/eval/fid_i3d": 40.0 + i, **counts}
        child.log_metrics({"random_weights/eval/fid_i3d": metrics["random_weights/eval/fid_i3d"]}, step=2)
        child.log_metrics({"G/total": 5.0 - i, "D/total": 1.0}, step=1)
        child.end()
        children[variant] = child.run_id
        records.append(TrialRecord(variant, variant, 0, spec.label, child.run_id, metrics))
    write_comparison(records, parent, root / "comparison", title=name)
    parent.end()
    exp = parent.client.get_experiment_by_name("sweep-ui").experiment_id
    return uri, exp, children, parent.run_id


@pytest.fixture
def mlflow_ui(tmp_path):
    uri, exp, children, parent_id = _log_sweep(tmp_path)
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(REPO / ".venv" / "bin" / "mlflow"), "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base, exp, children, parent_id
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_mlflow_ui_lists_sweep_runs_with_metric_columns(mlflow_ui, tmp_path):
    base, exp, children, parent_id = mlflow_ui
    compare = "#/compare-runs?runs=" + json.dumps(list(children.values())).replace(" ", "") + \
              "&experiments=" + json.dumps([exp]).replace(" ", "")
    shots = REPO / "docs" if os.environ.get("VID2VID_UPDATE_DOCS") else tmp_path
    shots.mkdir(exist_ok=True)
    script = tmp_path / "ui.js"
    script.write_text(SCRIPT)
    env = dict(os.environ, PLAYWRIGHT=str(PLAYWRIGHT), CHROMIUM=str(CHROMIUM), FLAGS=json.dumps(FLAGS),
               USER_DATA_DIR=str(tmp_path / "chromium-profile"), SHOTS=str(shots),
               FIRST_METRIC=METRICS[0])
    out = subprocess.run(["node", str(script), base, "sweep-ui", "abl", compare], env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, f"browser run failed:\n{out.stderr[-3000:]}\n{out.stdout[-2000:]}"
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print("requests refused (not 127.0.0.1):", sorted(set(seen["blocked"])))
    # the experiment opened on its runs table, not on a GenAI overview; and it is tagged a model-training one
    assert f"/experiments/{exp}/runs?workflowType=machine_learning" in seen["landed"], seen["landed"]
    kind = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment(exp).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"
    assert all((shots / f"mlflow-{name}.png").stat().st_size > 10_000
               for name in ("1-experiments", "2-runs", "3-children-and-metrics", "4-compare"))

    headers = set(seen["table"]["headers"])
    assert set(METRICS) <= headers, f"metric columns missing from the runs table: {sorted(headers)}"
    rows = seen["table"]["rows"]
    for i, variant in enumerate(VARIANTS):
        row = next((r for r in rows if f"abl-{variant}-s0" in r), None)
        assert row is not None, f"child run abl-{variant}-s0 not listed; rows: {rows}"
        for value in (f"{40 + i}", f"{1000 - 100 * i}", f"{500 - 10 * i}"):  # its metric cells
            assert value in row.split(), f"{variant}: metric value {value} not in its row {row!r}"
    assert any("abl" in r.split() for r in rows), f"parent run abl not listed; rows: {rows}"

    text = seen["compare"]
    assert "Comparing 4 Runs from 1 Experiment" in text
    for variant in VARIANTS:
        assert f"abl-{variant}-s0" in text and variant in text
    for metric in (*METRICS, "G/total"):
        assert metric in text

"""The MLflow UI shows what the platform writes: a real ``mlflow server`` (sqlite + artifact dir in tmp_path) on
127.0.0.1, populated through the platform's own code, opened in headless Debian Chromium through Selenium.

Populated like a lifecycle run: a pretraining run and two post-training runs with per-step metrics, each
post-training run registering the tiny model of ``write_model_dir`` with ``log_and_register`` (alias
``challenger``, as training does; a few seconds each, so the real pyfunc path rather than a stand-in artifact), and
the gate (``pipelines.evaluate.gate.gate`` on a hand-made passing report) promoting version 1 to ``champion`` and
logging its run in ``lingbot-gate``. The registered model page must then show ``champion`` on version 1 and
``challenger`` on version 2. Screenshots go to tmp_path and, when ``LINGBOT_UI_SCREENSHOT_DIR`` is set, there too.

Skipped only where Debian's ``chromium`` / ``chromium-driver`` are missing (``make install`` installs them).
"""

from __future__ import annotations

import os

# before mlflow is imported: its telemetry client is created at import time
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from pipelines.evaluate.gate import CHAMPION, GATE_EXPERIMENT, GateSettings, gate
from pipelines.tracking_store import ensure_experiment
from pipelines.train.registry import log_and_register, registered_name_for

sys.path.insert(0, str(Path(__file__).parents[1] / "pipelines" / "evaluate"))
from model_dirs import TASK, write_model_dir

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")  # Debian's chromium-driver, the same build as the browser
SERVER_START_S = 120.0  # mlflow server imports its whole app before it listens: ~25 s on 2 busy cores
UI_WAIT_S = 45.0  # the SPA fetches its bundle, then the page's data, after the page "loads"

STAGE_EXPERIMENTS = ("lingbot-pretrain", "lingbot-posttrain")  # Tracker: f"lingbot-{settings.stage}"
MODEL_NAME = registered_name_for("posttrain", TASK)  # lingbot-va-reach-v3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="headless UI test needs Debian's chromium and chromium-driver (`make install` as root "
                              "installs them; or apt-get install chromium chromium-driver)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` in its own process group on a free 127.0.0.1 port; stopped with its children."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        # the job runner serves GenAI jobs only; off, it leaves the busy cores to the server itself
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("w") as log:
            # own session: `mlflow server` runs uvicorn as a child, and stop() must end both
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {SERVER_START_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group is the one start_new_session made for it
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _passing_report(version: str) -> dict:
    """An evaluator report of ``version`` that passes the default gate (80% success over 50 episodes)."""
    task = {"episodes": 50, "successes": 40, "success_rate": 0.8, "progress": 0.9, "steps_to_success": 85.0,
            "episode_wall_s": 3.1, "nan_episodes": 0, "errors": 0}
    return {"model_uri": f"models:/{MODEL_NAME}/{version}", "registered_name": MODEL_NAME, "model_version": version,
            "mode": "sync", "seeds": [0], "tasks": {TASK: task}, "avg_success": 0.8, "episodes": 50,
            "nan_episodes": 0, "errors": 0}


def populate(url: str, data_dir: Path, model_dir: Path) -> None:
    """Pretrain run, post-training run -> v1 (challenger), gate -> v1 champion, post-training run -> v2 (challenger)."""
    mlflow.set_tracking_uri(url)
    with mlflow.start_run(experiment_id=ensure_experiment("lingbot-pretrain", data_dir), run_name="pretrain"):
        for step in range(5):
            mlflow.log_metrics({"loss": 2.0 / (step + 1), "lr": 1e-4}, step=step)
    for version in ("1", "2"):
        with mlflow.start_run(experiment_id=ensure_experiment("lingbot-posttrain", data_dir),
                              run_name=f"posttrain-{TASK}"):
            for step in range(5):
                mlflow.log_metrics({"loss": 1.0 / (step + 1), "loss_fdm": 0.5 / (step + 1)}, step=step)
            assert str(log_and_register(model_dir, registered_name=MODEL_NAME, alias="challenger")) == version
        if version == "1":
            decision = gate(_passing_report(version), GateSettings(tracking_uri=url, data_dir=data_dir))
            assert decision.passed, decision.reasons
    aliases = mlflow.MlflowClient(tracking_uri=url).get_registered_model(MODEL_NAME).aliases
    assert {a: str(v) for a, v in aliases.items()} == {CHAMPION: "1", "challenger": "2"}


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # explicit paths: Selenium Manager would otherwise try to download both
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, what: str, condition, shot: Path) -> None:
    """Wait (bounded) until ``condition(driver)`` is truthy; on timeout keep a screenshot and show the page text."""
    try:
        WebDriverWait(driver, UI_WAIT_S, poll_frequency=0.25).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(shot))
        text = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"MLflow UI: {what} not shown within {UI_WAIT_S} s (screenshot {shot}); page text:\n{text[-2000:]}")


def _version_row(driver: WebDriver, version: str) -> str:
    """Visible text of the registered-model table row of ``version`` ("" while it is not rendered)."""
    rows = driver.find_elements(
        By.XPATH, f"//a[@href='#/models/{MODEL_NAME}/versions/{version}']/ancestor::*[@role='row'][1]")
    return rows[0].text if rows else ""


def _keep(shots: list[Path]) -> None:
    target = os.environ.get("LINGBOT_UI_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy2(shot, Path(target) / shot.name)


def test_mlflow_ui_shows_experiments_and_registered_model_aliases(tmp_path, browser, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    mlflow.telemetry.set_telemetry_client()  # re-reads MLFLOW_DISABLE_TELEMETRY in case mlflow was imported earlier
    model_dir = write_model_dir(tmp_path / "model")
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with MlflowServer(tmp_path / "server") as server:
        try:
            populate(server.url, tmp_path / "data", model_dir)
        finally:
            mlflow.set_tracking_uri(previous_uri)  # None unsets the global URI

        experiments_shot = tmp_path / "mlflow-experiments.png"
        browser.get(f"{server.url}/#/experiments")
        names = (*STAGE_EXPERIMENTS, GATE_EXPERIMENT)
        body = lambda d: d.find_element(By.TAG_NAME, "body").text
        _wait(browser, f"experiments {names}", lambda d: all(n in body(d) for n in names), experiments_shot)
        browser.save_screenshot(str(experiments_shot))

        model_shot = tmp_path / "mlflow-registered-model.png"
        browser.get(f"{server.url}/#/models/{MODEL_NAME}")
        _wait(browser, f"{MODEL_NAME} with versions 1 and 2",
              lambda d: MODEL_NAME in body(d) and _version_row(d, "1") and _version_row(d, "2"), model_shot)
        # aliases arrive with the versions' data; each must sit on its own version's row, not just on the page
        _wait(browser, "champion on version 1 and challenger on version 2",
              lambda d: CHAMPION in _version_row(d, "1") and "challenger" in _version_row(d, "2"), model_shot)
        row1, row2 = _version_row(browser, "1"), _version_row(browser, "2")
        assert "Version 1" in row1 and "challenger" not in row1, row1
        assert "Version 2" in row2 and CHAMPION not in row2, row2
        browser.save_screenshot(str(model_shot))

    shots = [experiments_shot, model_shot]
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{shot} is not a PNG"
    _keep(shots)

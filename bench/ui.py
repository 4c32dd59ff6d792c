"""What a person sees in the MLflow UI after a training run, checked in a real browser.

    python bench/ui.py                      # trains a tiny run, checks the UI, screenshots to bench/results/ui/
    python bench/ui.py --out DIR --keep     # elsewhere; keep the temporary store and print its path

It trains a tiny run with ``python -m recsys.train`` into a temporary MLflow store, starts
``mlflow ui`` on 127.0.0.1 at a free port, and opens in headless Chromium (Debian's ``chromium``
package, driven over the DevTools protocol with aiohttp, which MLflow already depends on):

1. the experiment, as the address the training prints leads there: it must show the training runs
   (not MLflow's GenAI pages) and the run by its name;
2. the run the training printed: its page must show the per-size table (every size with its
   parameters and NDCG@10), and its *Model metrics* the chart of ``test/ndcg_10`` against size;
3. the experiment's logged models: one per size, each with its size and test NDCG@10;
4. the experiment's runs with the training run unfolded, in MLflow's default layout: one row per
   size (its child run), each with its logged model; and the runs' chart view: the section
   ``sizes`` first, one bar per size for each of its metrics (``sizes/test_ndcg_10``, ...). Both at
   1280x800 and 1600x1200 (``sizes_table_1280.png``, ``sizes_chart_1600.png``, ...; the
   ``docs/mlflow-sizes-*.png`` screenshots are these).

Each page is saved as a screenshot in ``--out``; the first failed check stops with its page saved
and the text the page showed. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [8, 16, 32]
VIEWPORT = (1280, 860)
SIZES_VIEWPORTS = [(1280, 800), (1600, 1200)]  # the screenshots of the sizes side by side


class CheckFailed(AssertionError):
    pass


# -- the run and the UI ------------------------------------------------------------------------------


def train_tiny(work: Path) -> dict:
    """Train a tiny run into ``work/mlflow.db`` through the command a user runs; its console output."""
    store = f"sqlite:///{work}/mlflow.db"
    args = [
        "--model.sizes", json.dumps(SIZES), "--data.synthetic.num_users", "150", "--data.synthetic.num_items", "120",
        "--data.synthetic_cache_dir", str(work / "synthetic"), "--data.max_len", "20", "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false", "--mlflow.tracking_uri", store,
        "--mlflow.artifact_location", str(work / "artifacts"), "--checkpoint.dirpath", str(work / "ckpt"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "recsys.train", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise CheckFailed(f"training failed:\n{done.stderr[-3000:]}")
    return {"store": store, "stdout": done.stdout}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow ui`` on 127.0.0.1:``port``, once it answers /health."""
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CheckFailed(f"mlflow ui exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    raise CheckFailed("mlflow ui did not answer within 180 s")


# -- the browser -------------------------------------------------------------------------------------


class Browser:
    """Headless Chromium, one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, profile: Path) -> None:
        self.executable, self.profile = executable, profile
        self._next_id = 0

    async def __aenter__(self) -> Browser:
        import aiohttp

        self.process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        active = self.profile / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.monotonic() + 60
        while not (active.is_file() and active.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise CheckFailed("chromium did not start")
            await asyncio.sleep(0.2)
        port = int(active.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(t for t in await response.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.resize(*VIEWPORT)
        return self

    async def resize(self, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.session.close()
        self.process.terminate()
        self.process.wait(timeout=30)

    async def send(self, method: str, **params) -> dict:
        self._next_id += 1
        await self.ws.send_json({"id": self._next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise CheckFailed(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, texts: list[str], timeout_s: float = 60) -> str:
        """The page's text once it holds every one of ``texts``."""
        deadline = time.monotonic() + timeout_s
        while True:
            shown = await self.text()
            missing = [t for t in texts if t not in shown]
            if not missing:
                return shown
            if time.monotonic() > deadline:
                raise CheckFailed(f"not shown within {timeout_s:.0f} s: {missing}\n--- the page showed:\n{shown[:3000]}")
            await asyncio.sleep(0.5)

    async def wait_until(self, expression: str, what: str, timeout_s: float = 30) -> None:
        """Until the JavaScript ``expression`` is true (``what`` it means, for the error)."""
        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise CheckFailed(f"not shown within {timeout_s:.0f} s: {what}")
            await asyncio.sleep(0.5)

    async def click(self, text: str, selector: str = "button, [role=tab], [role=radio], a") -> None:
        """Click the first element matching ``selector`` whose text is ``text``."""
        found = await self.evaluate(
            f"""(() => {{
                const el = [...document.querySelectorAll({json.dumps(selector)})]
                    .find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
                if (el) el.click();
                return Boolean(el);
            }})()"""
        )
        if not found:
            raise CheckFailed(f"no {selector} reading {text!r} on the page")

    async def unfold(self, run_name: str) -> None:
        """Unfold the runs table's row of ``run_name`` (the button in its name cell), showing its child runs."""
        found = await self.evaluate(
            f"""(() => {{
                const cell = [...document.querySelectorAll('[role=gridcell]')]
                    .find(c => c.innerText.split('\\n').some(line => line.trim() === {json.dumps(run_name)}));
                const button = cell && cell.querySelector('button');
                if (button) button.click();
                return Boolean(button);
            }})()"""
        )
        if not found:
            raise CheckFailed(f"no row of {run_name!r} to unfold in the runs table")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close_assistant(self) -> None:
        """Close MLflow's assistant panel, open in a new browser, so that the page gets the width."""
        await self.evaluate("document.querySelector('button[aria-label=Close]')?.click()")

    async def column_headers(self) -> list[str]:
        """Every column header of the page's grid (it draws only the visible ones: scroll through)."""
        seen: list[str] = []
        width = await self.evaluate("Math.max(...[...document.querySelectorAll('.ag-center-cols-viewport')].map(e => e.scrollWidth), 0)")
        for x in range(0, int(width) + 400, 300):
            await self.evaluate(f"document.querySelectorAll('.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport')"
                                f".forEach(e => e.scrollLeft = {x})")
            await asyncio.sleep(0.3)
            for header in json.loads(await self.evaluate(
                    "JSON.stringify([...document.querySelectorAll('[role=columnheader]')].map(e => e.innerText.trim()))")):
                if header not in seen:
                    seen.append(header)
        await self.evaluate("document.querySelectorAll('.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport')"
                            ".forEach(e => e.scrollLeft = 0)")
        return seen


# -- the checks --------------------------------------------------------------------------------------


def printed(stdout: str) -> dict:
    """What the training printed: the run's name and address, and the per-size table's rows (as printed)."""
    url = re.search(r"then open (http\S+)", stdout)
    if url is None:
        raise CheckFailed(f"the training printed no address of its run:\n{stdout[-2000:]}")
    rows = [dict(zip(("size", "parameters", "ndcg_10"), m.groups()))
            for m in re.finditer(r"^\| (\d+) \| ([\d,]+) \| ([\d.]+) \|", stdout, re.MULTILINE)]
    if [int(r["size"]) for r in rows] != SIZES:
        raise CheckFailed(f"the training printed no per-size table:\n{stdout[-2000:]}")
    name = re.search(r"^MLflow run '([^']+)'", stdout, re.MULTILINE)
    return {"url": url.group(1), "rows": rows, "run_name": name.group(1)}


async def check_pages(browser: Browser, base: str, run: dict, out: Path) -> list[str]:
    """Open the experiment, the run and the models; every check that passed, in order."""
    passed = []
    run_url = re.sub(r"^https?://[^/#]+", base, run["url"])  # `make ui`'s address: this server's instead
    experiment_id, run_id = re.search(r"#/experiments/(\w+)/runs/(\w+)", run_url).groups()
    training_pages = run_url.split("?", 1)[1]
    rows, name = run["rows"], run["run_name"]

    await browser.goto(f"{base}/#/experiments/{experiment_id}?{training_pages}")
    shown = await browser.wait_for([name, "Runs", "Models", "Model registry"])
    for genai in ("Agent versions", "Token Usage"):
        if genai in shown:
            raise CheckFailed(f"the experiment opens on MLflow's GenAI pages ({genai!r} shown)")
    await browser.close_assistant()
    await browser.screenshot(out / "experiment.png")
    passed.append(f"experiment: the training runs, {name!r} among them, not the GenAI pages")

    await browser.goto(run_url)
    expected = [name, "Description", "NDCG@10"] + [r["parameters"] for r in rows] + [r["ndcg_10"] for r in rows]
    await browser.wait_for(expected)
    await browser.close_assistant()
    await browser.click("Show more", "button, a, span")  # the description is shown folded
    await browser.wait_until("[...document.images].some(i => i.src.includes('accuracy_vs_size') && i.naturalWidth > 0)",
                             "the plot of accuracy against size")
    await browser.screenshot(out / "run.png")
    passed.append("run page: the per-size table (size, parameters, NDCG@10 of every size) and the plot")

    await browser.goto(run_url.replace(f"/runs/{run_id}?", f"/runs/{run_id}/model-metrics?"))
    await browser.wait_for([f"{name} (test/ndcg_10)", "Step"])
    await browser.close_assistant()
    await browser.screenshot(out / "run_metrics.png")
    passed.append("run page, Model metrics: the chart of test/ndcg_10 against size (step = size)")

    await browser.goto(f"{base}/#/experiments/{experiment_id}/models?{training_pages}")
    await browser.wait_for([f"d{s}" for s in SIZES])
    await browser.close_assistant()
    headers = await browser.column_headers()
    missing = [h for h in ("size", "parameters", "test/ndcg_10", "test/recall_10") if h not in headers]
    if missing:
        raise CheckFailed(f"the models table has no column {missing}; its columns: {headers}")
    passed.append("models, table: one per size, with size, parameters and test metrics as columns")

    await browser.goto(f"{base}/#/experiments/{experiment_id}/models?{training_pages}&viewMode=CHART")
    await browser.wait_for(["test/ndcg_10"] + [f"{float(r['ndcg_10']):.2f}" for r in rows])
    await browser.close_assistant()
    await browser.screenshot(out / "models_chart.png")
    passed.append("models, chart view: test/ndcg_10 of every size side by side")

    passed += await check_sizes(browser, f"{base}/#/experiments/{experiment_id}/runs?{training_pages}", rows, name, out)
    return passed


async def check_sizes(browser: Browser, runs_url: str, rows: list[dict], name: str, out: Path) -> list[str]:
    """The runs table with the training run unfolded (a row per size, each with its model) and the
    runs' chart view (the ``sizes`` section first, a bar per size), at each of ``SIZES_VIEWPORTS``."""
    labels = [f"d{s}" for s in SIZES]
    await browser.goto(runs_url)
    await browser.wait_for([name, "Run Name", "Models"])
    await browser.close_assistant()
    await browser.unfold(name)
    # a size's row reads its label twice: its name, and its logged model in the Models column
    await browser.wait_until(" && ".join(f"({cells_reading(label)} >= 2)" for label in labels),
                             f"rows {labels}, each with its logged model")
    for width, height in SIZES_VIEWPORTS:
        await browser.resize(width, height)
        await asyncio.sleep(1)
        await browser.screenshot(out / f"sizes_table_{width}.png")
    passed = ["runs table, the training run unfolded: one row per size, each with its logged model"]

    await browser.resize(*SIZES_VIEWPORTS[0])
    await browser.goto(f"{runs_url}&compareRunsMode=CHART")
    ndcg = [f"{float(r['ndcg_10']):.2f}" for r in rows]
    shown = await browser.wait_for(["sizes/test_ndcg_10", "sizes/parameters", *ndcg])
    lines = [line.strip() for line in shown.splitlines()]
    sections = [line for line, after in zip(lines, lines[1:]) if re.fullmatch(r"\(\d+\)", after)]  # "sizes", "(7)"
    if sections[:1] != ["sizes"]:
        raise CheckFailed(f"the chart view's first section is not 'sizes': its sections {sections}")
    for width, height in SIZES_VIEWPORTS:
        await browser.resize(width, height)
        await asyncio.sleep(2)  # the charts redraw at the new width
        await browser.screenshot(out / f"sizes_chart_{width}.png")
    await browser.resize(*VIEWPORT)
    passed.append("runs, chart view: the section 'sizes' first, one bar per size (test NDCG@10 of every size)")
    return passed


def cells_reading(label: str) -> str:
    """A JavaScript expression: how many cells of the page's grid read ``label`` on their last line
    (a run's name cell begins with its colour)."""
    return (f"[...document.querySelectorAll('[role=gridcell]')].filter(c => c.innerText.trim().split('\\n').pop().trim() === "
            f"{json.dumps(label)}).length")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ui", help="where the screenshots go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="the browser")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store (and print where)")
    args = parser.parse_args(argv)
    if not shutil.which(args.chromium):
        print(f"error: {args.chromium}: no such browser; install Debian's chromium package", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="recsys-ui-"))
    server = None
    try:
        start = time.monotonic()
        run = printed(train_tiny(work)["stdout"])
        print(f"trained {run['run_name']!r} in {time.monotonic() - start:.0f} s")
        port = free_port()
        server = start_ui(f"sqlite:///{work}/mlflow.db", port, work / "ui.log")

        async def browse() -> list[str]:
            async with Browser(args.chromium, work / "profile") as browser:
                try:
                    return await check_pages(browser, f"http://127.0.0.1:{port}", run, args.out)
                except CheckFailed:
                    await browser.screenshot(args.out / "failed.png")
                    raise

        for line in asyncio.run(browse()):
            print(f"ok: {line}")
        print(f"screenshots in {args.out}")
        return 0
    except CheckFailed as failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

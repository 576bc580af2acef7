#!/usr/bin/env bash
# The README's MLflow screenshots: a real `mlflow server` (SQLite behind it, artifacts proxied) in a
# temporary folder, the BreastMNIST recipe trained into it with --track, and its run page and epoch
# charts shot with headless Chromium. About 12 minutes on a 2-core CPU, most of it training.
#
#   bash docs/images/mlflow_screenshot.sh        # from the repository root
#
# Needs medvision with the tracking extra (pip install -e '.[tracking]'), BreastMNIST and the ImageNet
# weights under $MEDVISION_SHARED (default ../shared), and Chromium (`chromium`, or set CHROMIUM).
# Writes docs/images/mlflow_run.png (the run's overview, its metrics filtered to test_) and
# docs/images/mlflow_metrics.png (the epochs' loss, AUC, accuracy and learning rate).
#
# Chromium is driven over its DevTools protocol rather than with --screenshot, to set two of the MLflow
# UI's own preferences in the fresh browser profile before the page loads ("Model training" rather than
# "GenAI", and the assistant panel not opened), to type into the page's search boxes, and to wait for
# the numbers to be on the page instead of for a fixed time.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
out="$repo/docs/images"
export MEDVISION_SHARED="${MEDVISION_SHARED:-$repo/../shared}"
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
chromium="${CHROMIUM:-chromium}"
work=$(mktemp -d -t medvision-mlflow-XXXXXX)
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
uri="http://127.0.0.1:$port"

# the server and its workers in a process group of their own, stopped together on exit
setsid mlflow server --backend-store-uri "sqlite:///$work/mlflow.db" --artifacts-destination "$work/mlartifacts" \
    --host 127.0.0.1 --port "$port" --workers 1 >"$work/server.log" 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 60); do
    curl -sf "$uri/health" >/dev/null && break
    sleep 1
done
curl -sf "$uri/health" >/dev/null || { cat "$work/server.log"; echo "mlflow server did not start" >&2; exit 1; }

(cd "$work" && medvision train "$repo/recipes/breastmnist_effnet_lite0_gray.yaml" --track \
    --set train.amp=none --set output_dir="$work/runs" --set tracking.uri="$uri")

python - "$uri" "$out" "$chromium" <<'EOF'
"""Shoots the run's overview and its epoch charts over the DevTools protocol, then shrinks the PNGs."""

import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
from mlflow.tracking import MlflowClient
from PIL import Image

uri, out, chromium = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
client = MlflowClient(uri)
experiment = client.get_experiment_by_name("medvision").experiment_id
run = client.search_runs([experiment], max_results=1)[0].info.run_id
page = f"{uri}/#/experiments/{experiment}/runs/{run}"
# (url, file, text that says the page has its data, search box to type into, what to type)
SHOTS = [
    (page, "mlflow_run.png", "best_val_auc", "Search metrics", "test_"),
    (f"{page}/model-metrics", "mlflow_metrics.png", "val_auc", "Search metric charts",
     "^(train_loss|val_loss|val_auc|val_acc|lr)$"),
]
# the MLflow UI's preferences (localStorage, key_v1 = JSON), set before its scripts run
PRESET = """
localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning'));
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
"""


async def shoot(ws_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        ids = iter(range(1, 10**9))

        async def call(method: str, **params):
            i = next(ids)
            await ws.send_json({"id": i, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == i:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data["result"]
            raise RuntimeError(f"{method}: Chromium closed the connection")

        async def evaluate(expression: str):
            return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

        await call("Page.enable")
        await call("Page.addScriptToEvaluateOnNewDocument", source=PRESET)
        await call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        for url, name, wait_for, box, text in SHOTS:
            await call("Page.navigate", url=url)
            deadline = time.time() + 60
            while not await evaluate(f"document.body.innerText.includes({json.dumps(wait_for)})"):
                if time.time() > deadline:
                    raise RuntimeError(f"{url}: {wait_for!r} not on the page after 60 s")
                await asyncio.sleep(0.5)
            selector = json.dumps(f'input[placeholder="{box}"]')
            found = f"document.querySelector({selector})"
            if not await evaluate(f"(() => {{ const e = {found}; e?.focus(); return !!e; }})()"):
                raise RuntimeError(f"{url}: no search box {box!r}")
            await call("Input.insertText", text=text)
            await evaluate("document.activeElement.blur()")
            await asyncio.sleep(5)  # the filtered table and the charts redraw
            png = base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])
            (out / name).write_bytes(png)


with tempfile.TemporaryDirectory(prefix="medvision-chromium-") as profile:
    browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        for _ in range(150):
            if port_file.exists() and len(port_file.read_text().split()) == 2:
                break
            time.sleep(0.2)
        debug = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug}/json"))
        asyncio.run(shoot(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]))
    finally:
        browser.terminate()
        browser.wait()

for _, name, *_ in SHOTS:  # a UI screenshot has few colours: a 256-colour palette keeps it sharp and small
    path = out / name
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path.relative_to(out.parent.parent)}: {path.stat().st_size // 1024} KB, run {run}")
EOF

"""The pictures of docs/dashboards.md, from a demo cache (`sqsd demo --cache DIR`): the `sqsd report` plots of the
demo's monitored fine-tune, and TensorBoard's scalars of the same fine-tune rerun with ``report_to=["tensorboard"]``,
rendered in headless Chromium.

    python docs/screenshots.py --cache sqsd_demo [--chromium /usr/bin/chromium]

Needs the `app` extra, tensorboard and a Chromium binary (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

IMG = Path(__file__).with_name("img")


def report_pictures(cache: Path) -> None:
    """Copy the demo fine-tune's `sqsd report` plots."""
    report = cache / "finetune" / "sqsd" / "report"
    for name in ("drift", "layers", "scores"):
        shutil.copyfile(report / f"{name}.png", IMG / f"report-{name}.png")


def tensorboard_run(cache: Path, out: Path) -> Path:
    """The demo's fine-tune once more, as the demo runs it, with TensorBoard logging every step."""
    from sqsd_callback import SQSDCallback
    from sqsd_callback.sinks import read_jsonl
    from sqsd_lab import data
    from sqsd_lab.adapters import direction_sets, theta_0
    from sqsd_lab.demo import DemoSizes
    from sqsd_lab.finetune import lora_config, train_lora

    sizes = DemoSizes()
    model, tokenizer = data.load_model(None)
    theta_0(model, cache / "directions")
    danger, safety = direction_sets(cache / "directions")
    samples = data.tokenize_chats(tokenizer, read_jsonl(cache / "data" / "finetune.jsonl"), sizes.max_length)
    train_lora(model, tokenizer, samples, out, lora=lora_config(sizes.rank),
               callbacks=[SQSDCallback(danger=[danger], safety=[safety])], num_train_epochs=sizes.epochs,
               learning_rate=sizes.learning_rate, logging_steps=1, report_to=["tensorboard"])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_picture(logdir: Path, chromium: str) -> None:
    """Serve ``logdir`` with TensorBoard and screenshot its scalars page, filtered to the sqsd/ tags."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port",
                               str(port), "--bind_all"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://localhost:{port}"
        for _ in range(60):
            try:
                urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(1)
        # the Scalars dashboard (SVG charts, which headless Chromium draws without a GPU), filtered to sqsd/
        subprocess.run([chromium, "--headless", "--no-sandbox", "--hide-scrollbars", "--window-size=1500,770",
                        "--virtual-time-budget=30000", f"--screenshot={IMG / 'tensorboard.png'}",
                        f"{url}/?darkMode=false#scalars&tagFilter=sqsd"],
                       check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        server.terminate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="sqsd_demo", help="a finished `sqsd demo` cache")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    opts = p.parse_args()
    cache = Path(opts.cache)
    IMG.mkdir(exist_ok=True)
    report_pictures(cache)
    run = cache / "screenshots-run"
    if not (run / "sqsd" / "tensorboard").is_dir():
        tensorboard_run(cache, run)
    tensorboard_picture(run, opts.chromium)
    print(f"pictures in {IMG}")


if __name__ == "__main__":
    main()

"""Take docs/playground.png: `e2p serve` on the bundled backbone and the shipped projector, a few people stored
from their profile texts, and headless Chromium (Debian's `chromium` + `chromium-driver`, through Selenium) at
1280x800 picking two of them, typing a profile, sending one message and waiting for every column's real reply.

    python scripts/playground_screenshot.py                       # about a minute on 2 CPU cores
    python scripts/playground_screenshot.py --url http://127.0.0.1:8000 --admin-key KEY   # a running server
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PEOPLE = {
    "ana": "I am a nurse. I love hiking with my two dogs. I grow tomatoes on my balcony.",
    "marco": "I am a chef in Paris. I collect old cookbooks. I ride my bike to the market every morning.",
    "li": "I study astronomy. I play the violin in a student orchestra. I drink too much green tea.",
    "sam": "I drive a truck across the country. I listen to history podcasts. I have three grandchildren.",
    "noor": "I teach primary school. I knit scarves for my family. I am learning to surf.",
    "otto": "I fix old motorbikes. I play drums in a heavy metal band. I hate mornings.",
    "rosa": "I am a retired judge. I play chess online every night. I volunteer at the library.",
    "kai": "I am a software developer. I climb on weekends. I keep a pet snake named Byte.",
}
PICKED = ["ana", "otto"]
PROFILE = "I am a beekeeper. I sell honey at the farmers market and I sing in a choir."
MESSAGE = "What do you like to do on weekends?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, api_key: str, admin_key: str, store: Path) -> tuple[subprocess.Popen, str]:
    """`e2p serve` on a free loopback port; returns once /healthz answers."""
    port = free_port()
    command = [sys.executable, "-m", "e2p", "serve", "--projector", args.projector, "--store", str(store),
               "--port", str(port)]
    if args.backbone:
        command += ["--backbone", args.backbone]
    env = {**os.environ, "E2P_API_KEY": api_key, "E2P_ADMIN_KEY": admin_key}
    log = open(store.with_suffix(".log"), "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"e2p serve exited ({process.returncode}); its log: {store.with_suffix('.log')}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    sys.exit("e2p serve did not answer /healthz within 10 minutes")


def store_people(url: str, admin_key: str) -> None:
    for user, text in PEOPLE.items():
        r = httpx.put(f"{url}/v1/users/{user}/embedding", json={"text": text},
                      headers={"authorization": f"Bearer {admin_key}"}, timeout=120)
        r.raise_for_status()


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        sys.exit("needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`)")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                f"--window-size={width},{height}", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return chrome


def drive(url: str, admin_key: str, out: Path, max_tokens: int, width: int = 1280, height: int = 800) -> None:
    """The page as a person uses it, then a screenshot of what they see."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chrome = browser(width, height)
    try:
        chrome.get(url + "/playground")
        until = WebDriverWait(chrome, 600, poll_frequency=0.1).until
        chrome.find_element(By.ID, "key").send_keys(admin_key + Keys.ENTER)
        until(lambda d: "admin" in d.find_element(By.ID, "key-status").text)
        for user in PICKED:
            chrome.find_element(By.ID, "user-id").send_keys(user + Keys.ENTER)
            until(lambda d: d.find_elements(By.CSS_SELECTOR, f'.chip[data-user="{user}"]'))
        chrome.find_element(By.ID, "profile").send_keys(PROFILE)
        for field, value in (("max-tokens", str(max_tokens)), ("seed", "7")):
            chrome.find_element(By.ID, field).clear()
            chrome.find_element(By.ID, field).send_keys(value)
        chrome.find_element(By.ID, "message").send_keys(MESSAGE + Keys.ENTER)
        until(lambda d: d.execute_script(
            "const c = [...document.querySelectorAll('.column')];"
            "return c.length > 0 && c.every(x => x.dataset.state === 'done' || x.dataset.state === 'error')"))
        failed = chrome.execute_script("return [...document.querySelectorAll('.column[data-state=error]')]"
                                       ".map(c => c.dataset.column + ': ' + c.querySelector('.column-error').textContent)")
        if failed:
            sys.exit("columns failed, no screenshot taken:\n" + "\n".join(failed))
        chrome.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        time.sleep(0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        chrome.save_screenshot(str(out))
    finally:
        chrome.quit()
    with open(out, "rb") as f:
        size = struct.unpack(">II", f.read(24)[16:24])
    if size != (width, height):
        sys.exit(f"{out} is {size[0]}x{size[1]}, not {width}x{height}")
    print(f"wrote {out} ({width}x{height})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "playground.png"), help="the PNG to write")
    parser.add_argument("--projector", default="persona-deep-k1", help="a shipped name or a folder `e2p train` wrote")
    parser.add_argument("--backbone", default=None, help="the backbone to serve (default: the bundled one)")
    parser.add_argument("--max-tokens", type=int, default=40, help="max_tokens of each reply")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--admin-key", default=None, help="the running server's admin key (with --url)")
    args = parser.parse_args()
    if args.url:
        if not args.admin_key:
            sys.exit("--url needs --admin-key: the people are stored and the map drawn with it")
        store_people(args.url, args.admin_key)
        drive(args.url, args.admin_key, Path(args.out), args.max_tokens)
        return
    with tempfile.TemporaryDirectory(prefix="e2p-playground-") as tmp:
        admin_key = "screenshot-admin"
        process, url = start_server(args, "screenshot-user", admin_key, Path(tmp) / "users.db")
        try:
            store_people(url, admin_key)
            drive(url, admin_key, Path(args.out), args.max_tokens)
        finally:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    main()

"""A real `jetmoe serve` process on localhost, and small polling helpers for the serving tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "toy"
API_KEY = "sk-test-3b1f"  # the guarded server's key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None, api_key: str = "unused"):
        self.api_key = api_key  # what client() sends
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "jetmoe"
        command = [
            str(script),
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            *args,
        ]
        self.log = open(model_dir.parent / f"server-{self.port}.log", "w+")
        inherited = {k: v for k, v in os.environ.items() if k != "JETMOE_API_KEY"}  # a key only where a test sets one
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env={**inherited, **(env or {})}
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def client(self, api_key: str | None = None):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key or self.api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

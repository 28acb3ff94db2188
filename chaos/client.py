"""The harness's side of the client agent: asyncio calls answered over the agent's pipes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from chaos.net import CLIENT_NS, in_ns

REPO = Path(__file__).resolve().parent.parent


class AgentError(Exception):
    """The agent could not be started or stopped answering."""


class CallError(Exception):
    """An RPC made by the agent failed: `code` is the gRPC status name ("CLIENT" for a problem
    found before calling, "AGENT" when the agent did not answer in time)."""

    def __init__(self, code: str, message: str, phase: str = "", detail: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.phase = phase
        self.detail = detail or {}


class AgentClient:
    def __init__(self, fleet_dir: Path, client_creds: Path, log_path: Path) -> None:
        self.fleet_dir = fleet_dir
        self.client_creds = client_creds
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout_s: float = 60.0) -> None:
        argv = in_ns(
            CLIENT_NS,
            [
                sys.executable,
                "-m",
                "chaos.agent",
                "--fleet",
                str(self.fleet_dir),
                "--client-creds",
                str(self.client_creds),
            ],
        )
        log = self.log_path.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                limit=64 * 1024 * 1024,
            )
        finally:
            log.close()
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(), name="agent-reader")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except TimeoutError:
            raise AgentError(
                f"the client agent did not start within {timeout_s:.0f}s; see {self.log_path}"
            ) from None

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            if not line:
                break
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            rid = reply.get("id")
            if rid is None:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(True)
                continue
            future = self._waiting.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(reply)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(AgentError(f"the client agent exited; see {self.log_path}"))
        self._waiting.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(AgentError(f"the client agent exited at start; see {self.log_path}"))

    async def call(self, op: str, timeout_s: float = 10.0, **args: Any) -> dict:
        """Run `op` in the agent with a per-RPC deadline of `timeout_s`; its result, or CallError
        with the gRPC code. An op makes at most two RPCs, so the agent gets twice that to answer."""
        if self.process is None or self.process.stdin is None:
            raise AgentError("the client agent is not running")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        self.process.stdin.write(
            json.dumps({"id": rid, "op": op, "args": {**args, "timeout_s": timeout_s}}).encode() + b"\n"
        )
        await self.process.stdin.drain()
        try:
            reply = await asyncio.wait_for(future, 2 * timeout_s + 5.0)
        except TimeoutError:
            self._waiting.pop(rid, None)
            raise CallError(
                "AGENT",
                f"{op} on {args.get('address')}: no answer from the agent in {2 * timeout_s + 5:.0f}s",
            ) from None
        if reply.get("ok"):
            return reply["result"]
        raise CallError(
            reply.get("code", "CLIENT"), reply.get("error", ""), reply.get("phase", ""), reply.get("detail")
        )

    async def close(self) -> None:
        if self.process is None:
            return
        if self.process.stdin is not None:
            with contextlib.suppress(Exception):
                self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 3.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        self.process = None

"""The Python API: a VM sandbox for running untrusted commands.

    with kabuto.Sandbox(hypervisor="qemu") as sb:
        result = sb.run(["uname", "-r"])
        print(result.exit_code, result.stdout)

``AsyncSandbox`` is the same over asyncio. ``Sandbox`` drives an ``AsyncSandbox`` on an event
loop of its own in a background thread, so it works the same from plain scripts, threads and
programs that already run an event loop (where ``asyncio.run`` per call would fail).

The sandbox is one VM holding one long-lived container (rootfs: the given directory, or a
busybox one made for it); every ``run``/``spawn`` is an exec in it, so processes share its
files. Its state is persisted like a CLI container's, so ``kabuto list`` shows it and
``kabuto delete --force`` removes it if this process dies.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kabuto.errors import KabutoError
from kabuto.runtime import commands, streaming
from kabuto.runtime.bundle import Bundle, default_spec, join_network_namespace, load_bundle, process_spec
from kabuto.runtime.busybox import make_busybox_rootfs
from kabuto.runtime.sandbox import DEFAULT_BOOT_TIMEOUT, VirtSandbox, create_sandbox_for
from kabuto.runtime.state import StateStore

T = TypeVar("T")
# The container's first process only keeps the container alive; commands are execs.
KEEPALIVE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"]
# The host keeps what a `run` collects in memory: bound it (stream() has no bound).
MAX_CAPTURE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class RunResult:
    stdout: bytes
    stderr: bytes
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class AsyncSandbox:
    """``async with AsyncSandbox() as sb: await sb.run([...])``."""

    def __init__(self, *, hypervisor: str | None = None, config: str | None = None,
                 rootfs: str | Path | None = None, state_root: str | Path | None = None,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT, env: list[str] | None = None,
                 readonly_root: bool = False, binds: dict[str, str | Path] | None = None,
                 readonly_binds: dict[str, str | Path] | None = None, netns: str | None = None) -> None:
        """``binds``/``readonly_binds``: container path -> host directory or file, bind-mounted
        read-write / read-only (through the sandbox's shared filesystem). ``netns``: the network
        namespace (a path, as CNI or ``ip netns add`` made it) whose interfaces the VM gets."""
        self._options = commands.RuntimeOptions(StateStore(Path(state_root) if state_root else None), config,
                                                hypervisor, boot_timeout)
        self._rootfs = Path(rootfs) if rootfs is not None else None
        self._env = list(env or [])
        self._readonly_root = readonly_root
        self._netns = netns
        self._binds = [(dest, Path(src), "rw") for dest, src in (binds or {}).items()]
        self._binds += [(dest, Path(src), "ro") for dest, src in (readonly_binds or {}).items()]
        self._sandbox: VirtSandbox | None = None
        self._workdir: Path | None = None
        self.id = f"py-{secrets.token_hex(6)}"

    async def start(self) -> AsyncSandbox:
        if self._sandbox is not None:
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix="kabuto-sandbox-"))
        try:
            bundle = await asyncio.to_thread(self._prepare_bundle, self._workdir)
            options = self._options
            sandbox = await create_sandbox_for(
                self.id, bundle, options.store, config_path=options.config_path,
                hypervisor_name=options.hypervisor_name, hostname=self.id, boot_timeout=options.boot_timeout)
            try:
                await sandbox.start_container(self.id)
            except BaseException:
                await sandbox.destroy()
                raise
            self._sandbox = sandbox
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        return self

    def _prepare_bundle(self, workdir: Path) -> Bundle:
        rootfs = self._rootfs if self._rootfs is not None else make_busybox_rootfs(workdir / "rootfs")
        spec = default_spec(KEEPALIVE, str(Path(rootfs).absolute()))
        spec["root"]["readonly"] = self._readonly_root
        spec["hostname"] = self.id
        spec["process"]["env"] += self._env
        if self._netns is not None:
            join_network_namespace(spec, self._netns)
        spec["mounts"] += [{"destination": dest, "type": "bind", "source": str(src.absolute()),
                            "options": ["rbind", mode]} for dest, src, mode in self._binds]
        (workdir / "config.json").write_text(json.dumps(spec, indent=2))
        return load_bundle(workdir)

    async def close(self) -> None:
        sandbox, self._sandbox = self._sandbox, None
        try:
            if sandbox is not None:
                await sandbox.destroy()
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def sandbox(self) -> VirtSandbox:
        if self._sandbox is None:
            raise KabutoError("the sandbox is not running (use it in a with block, or call start())")
        return self._sandbox

    async def _exec(self, args: list[str], env: list[str] | None, cwd: str | None) -> str:
        sandbox = self.sandbox
        process = process_spec(list(args), sandbox.container(self.id).process, env=env, cwd=cwd)
        exec_id = f"exec-{secrets.token_hex(4)}"
        await sandbox.exec_process(self.id, exec_id, process)
        return exec_id

    async def run(self, args: list[str], *, stdin: bytes | None = None, env: list[str] | None = None,
                  cwd: str | None = None, timeout: float | None = None) -> RunResult:
        """Run ``args`` to completion; its output is collected (up to MAX_CAPTURE_BYTES each).

        With ``timeout`` the process is killed (SIGKILL) when it runs longer, and the result
        has exit code 137 as a shell would report it.
        """
        out, err = bytearray(), bytearray()
        exec_id = await self._exec(args, env, cwd)
        io = streaming.ProcessIO(stdout=_collector(out, "stdout", args),
                                 stderr=_collector(err, "stderr", args),
                                 stdin=_once(stdin) if stdin else None)
        task = asyncio.ensure_future(streaming.run_process(self.sandbox, self.id, exec_id, io))
        try:
            status = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            await self.sandbox.kill(self.id, 9, exec_id=exec_id)
            status = await task
        return RunResult(bytes(out), bytes(err), status)

    async def stream(self, args: list[str], *, stdin: bytes | None = None, env: list[str] | None = None,
                     cwd: str | None = None) -> AsyncIterator[tuple[str, bytes | int]]:
        """Yield ("stdout", chunk) and ("stderr", chunk) as they come, then ("exit", code)."""
        queue: asyncio.Queue[tuple[str, bytes | int]] = asyncio.Queue(64)

        def into_queue(name: str) -> streaming.Sink:
            async def put(data: bytes) -> None:
                await queue.put((name, data))
            return put

        exec_id = await self._exec(args, env, cwd)
        io = streaming.ProcessIO(stdout=into_queue("stdout"), stderr=into_queue("stderr"),
                                stdin=_once(stdin) if stdin else None)
        task = asyncio.ensure_future(streaming.run_process(self.sandbox, self.id, exec_id, io))
        task.add_done_callback(lambda t: None if t.cancelled() or t.exception() else queue.put_nowait(
            ("exit", t.result())))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    getter = asyncio.ensure_future(queue.get())
                item = await getter
                yield item
                if item[0] == "exit":
                    return
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def copy_in(self, data: bytes | str | Path, path: str, mode: int = 0o644) -> None:
        """Write ``data`` (bytes, or the contents of a host file) to ``path`` in the container."""
        if not isinstance(data, bytes):
            data = await asyncio.to_thread(Path(data).read_bytes)
        await self.sandbox.containers.copy_file_in(path, data, mode, container_id=self.id)

    async def copy_out(self, path: str, max_bytes: int = MAX_CAPTURE_BYTES) -> bytes:
        """The contents of ``path`` in the container (an error above ``max_bytes``)."""
        return await self.sandbox.containers.copy_file_out(path, container_id=self.id, max_size=max_bytes)

    async def spawn(self, args: list[str], *, env: list[str] | None = None,
                    cwd: str | None = None) -> Process:
        """Start ``args`` in the background; see Process."""
        exec_id = await self._exec(args, env, cwd)
        return Process(self, exec_id, args)


def _collector(buffer: bytearray, name: str, args: list[str]) -> streaming.Sink:
    """Collects a process's output into ``buffer``, at most MAX_CAPTURE_BYTES: the guest decides
    how much it sends, the host decides how much it keeps."""
    async def collect(data: bytes) -> None:
        if len(buffer) + len(data) > MAX_CAPTURE_BYTES:
            raise KabutoError(f"{name} of {args[0]!r} exceeds {MAX_CAPTURE_BYTES} bytes; use stream()")
        buffer.extend(data)
    return collect


class Process:
    """A background process in an AsyncSandbox: ``await p.wait()`` collects its output."""

    def __init__(self, owner: AsyncSandbox, exec_id: str, args: list[str]) -> None:
        self._owner = owner
        self.exec_id = exec_id
        self._out, self._err = bytearray(), bytearray()
        io = streaming.ProcessIO(stdout=_collector(self._out, "stdout", args),
                                 stderr=_collector(self._err, "stderr", args))
        self._task = asyncio.ensure_future(streaming.run_process(owner.sandbox, owner.id, exec_id, io))

    async def wait(self) -> RunResult:
        status = await self._task
        return RunResult(bytes(self._out), bytes(self._err), status)

    async def kill(self, signal_number: int = 15) -> None:
        await self._owner.sandbox.kill(self._owner.id, signal_number, exec_id=self.exec_id)


class Sandbox:
    """The blocking face of AsyncSandbox; same arguments and methods."""

    def __init__(self, **kwargs: Any) -> None:
        self._async = AsyncSandbox(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self._async.id

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coroutine.close()
            raise KabutoError("the sandbox is not running (use it in a with block, or call start())")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> Sandbox:
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name=f"kabuto-{self.id}", daemon=True)
        self._thread.start()
        self._loop = loop
        try:
            self._call(self._async.start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._async.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, args: list[str], **kwargs: Any) -> RunResult:
        return self._call(self._async.run(args, **kwargs))

    def stream(self, args: list[str], **kwargs: Any) -> Iterator[tuple[str, bytes | int]]:
        """Yield ("stdout"|"stderr", chunk) as output arrives, then ("exit", code)."""
        generator = self._async.stream(args, **kwargs)
        try:
            while True:
                try:
                    item = self._call(generator.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if self._loop is not None:
                self._call(generator.aclose())

    def copy_in(self, data: bytes | str | Path, path: str, mode: int = 0o644) -> None:
        self._call(self._async.copy_in(data, path, mode))

    def copy_out(self, path: str, max_bytes: int = MAX_CAPTURE_BYTES) -> bytes:
        return self._call(self._async.copy_out(path, max_bytes))

    def spawn(self, args: list[str], **kwargs: Any) -> SyncProcess:
        return SyncProcess(self, self._call(self._async.spawn(args, **kwargs)))


class SyncProcess:
    def __init__(self, owner: Sandbox, process: Process) -> None:
        self._owner = owner
        self._process = process

    def wait(self) -> RunResult:
        return self._owner._call(self._process.wait())

    def kill(self, signal_number: int = 15) -> None:
        self._owner._call(self._process.kill(signal_number))


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


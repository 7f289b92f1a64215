"""A `kabuto` CLI process for the reliability tests: its stdout and stderr in files (a detached
container's monitor may inherit them, so pipes would not end with the CLI), read as they grow."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from test_runtime_helpers import KABUTO

# the one line `kabuto` prints for a VM that died under a call
VM_EXITED = re.compile(rb"kabuto: sandbox '(?P<id>[\w.-]+)': its VM exited \((?P<reason>[^)]*)\); "
                       rb"\w+ failed\n")


class Cli:
    """A `kabuto` process with its stdout and stderr in files (a monitor may inherit them)."""

    def __init__(self, root: Path, *args: str) -> None:
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        env = {**os.environ, "KABUTO_STATE_ROOT": str(root)}
        self.process = subprocess.Popen([str(KABUTO), *args], stdin=subprocess.DEVNULL, stdout=self.out,
                                        stderr=self.err, env=env, start_new_session=True)

    def output(self) -> tuple[bytes, bytes]:
        self.out.seek(0)
        self.err.seek(0)
        return self.out.read(), self.err.read()

    def wait_for_stdout(self, text: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output()[0]:
            assert self.process.poll() is None, f"{self.process.args} ended early: {self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} from {self.process.args} in {timeout:g}s"
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.out.close()
        self.err.close()

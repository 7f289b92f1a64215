"""`kabuto image path`: the built image, or the configuration's own boot media."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from kabuto.cli.main import cli
from kabuto.errors import ImageError
from kabuto.image.cache import CACHE_ENV, GuestImage, _set_current, installed_image


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("KABUTO_CONFIG", raising=False)
    return tmp_path / "cache"


def install_fake_image(cache: Path) -> GuestImage:
    image_dir = cache / "image" / "k1"
    image_dir.mkdir(parents=True)
    image = GuestImage(kernel=image_dir / "vmlinuz", initrd=image_dir / "initrd.img", key="k1",
                       kernel_version="6.1.0-1-amd64", flavour="generic", compression="gzip")
    image.kernel.write_bytes(b"k")
    image.initrd.write_bytes(b"i")
    _set_current(cache / "image", image)
    return image


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_path_json_names_the_built_image(cache: Path) -> None:
    image = install_fake_image(cache)
    code, output = run("image", "path", "--format", "json")
    assert code == 0, output
    assert json.loads(output) == {"kernel": str(image.kernel), "initrd": str(image.initrd)}


def test_path_text(cache: Path) -> None:
    image = install_fake_image(cache)
    code, output = run("image", "path")
    assert code == 0, output
    assert output.splitlines() == [f"kernel {image.kernel}", f"initrd {image.initrd}"]


def test_the_configuration_s_boot_media_win_over_the_built_image(cache: Path, tmp_path: Path) -> None:
    install_fake_image(cache)
    config = tmp_path / "configuration.toml"
    config.write_text(textwrap.dedent("""
        [hypervisor.qemu]
        kernel = "/opt/guest/vmlinuz"
        image = "/opt/guest/rootfs.img"
    """))
    code, output = run("--config", str(config), "image", "path", "--format", "json")
    assert code == 0, output
    assert json.loads(output) == {"kernel": "/opt/guest/vmlinuz", "image": "/opt/guest/rootfs.img"}


def test_without_any_image_the_error_says_how_to_build_one(cache: Path) -> None:
    result = CliRunner().invoke(cli, ["image", "path", "--format", "json"])
    assert isinstance(result.exception, ImageError)  # kabuto's main() prints it as "kabuto: ..."
    assert "kabuto image build" in str(result.exception)


def test_installed_image_reads_the_record(cache: Path) -> None:
    image = install_fake_image(cache)
    found = installed_image()
    assert found == image
    assert found.kernel_version == "6.1.0-1-amd64" and found.flavour == "generic"


def test_build_without_a_terminal_prints_a_line_per_step_and_heartbeat(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` in CI: no terminal, so no bar; each step the build reports, and each heartbeat
    of a long step (the kernel's compile), is a line of its own on stderr, as it happens."""
    from kabuto.cli import image_cmd
    from kabuto.image import STEPS

    image = GuestImage(kernel=cache / "vmlinux", initrd=cache / "initrd.img", key="k2",
                       kernel_version="6.1.192", flavour="custom", compression="none")
    heartbeat = f"{STEPS[3]}: 1234 objects compiled in 90 s"

    async def build(force: bool, flavour: str, compression: str, progress) -> GuestImage:  # type: ignore[no-untyped-def]
        for step in (STEPS[0], STEPS[3], heartbeat, *STEPS[4:]):
            progress(step)
        return image

    monkeypatch.setattr(image_cmd, "build_guest_image", build)
    result = CliRunner().invoke(cli, ["image", "build"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split("] ", 1)[1] for line in lines] == [STEPS[0], STEPS[3], heartbeat, *STEPS[4:]]
    assert all(line.split("]")[0].endswith(" s") for line in lines)
    assert f"kernel {image.kernel}" in result.stdout

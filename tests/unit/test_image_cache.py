"""The image cache: keyed by every input, reused when nothing changed, never half-written."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kabuto.errors import ImageError
from kabuto.image import builder, cache, debian
from kabuto.image.builder import build_image
from kabuto.image.cache import BuildInputs, installed_image
from kabuto.image.rootfs import GUEST_CODE

BASE = BuildInputs(
    flavour="generic",
    compression="gzip",
    packages=(debian.Package("linux-image-6.1.0-1-amd64", "6.1.1-1"),
              debian.Package("busybox-static", "1:1.35")),
    builder_hash="b" * 64,
    guest_code_hash="g" * 64,
    protobuf_version="5.0.0",
)


@pytest.mark.parametrize(
    "change",
    [
        {"flavour": "cloud"},
        {"compression": "zstd"},
        {"packages": (debian.Package("linux-image-6.1.0-1-amd64", "6.1.1-2"), BASE.packages[1])},
        {"packages": BASE.packages[:1]},
        {"builder_hash": "c" * 64},
        {"guest_code_hash": "h" * 64},
        {"protobuf_version": "5.0.1"},
    ],
)
def test_every_input_changes_the_key(change: dict[str, object]) -> None:
    assert dataclasses.replace(BASE, **change).key() != BASE.key()  # type: ignore[arg-type]


def test_equal_inputs_give_the_same_key() -> None:
    same = BuildInputs(**{f.name: getattr(BASE, f.name) for f in dataclasses.fields(BASE)})
    assert same.key() == BASE.key()


def test_code_hash_follows_content_not_bytecode(tmp_path: Path) -> None:
    (tmp_path / "guest").mkdir()
    (tmp_path / "guest/service.py").write_text("x = 1\n")
    (tmp_path / "errors.py").write_text("class E(Exception): ...\n")
    entries = ("errors.py", "guest")
    before = cache.hash_files(tmp_path, entries, (".py",))

    (tmp_path / "guest/__pycache__").mkdir()
    (tmp_path / "guest/__pycache__/service.cpython-311.pyc").write_bytes(b"bytecode")
    (tmp_path / "guest/notes.txt").write_text("not code")
    assert cache.hash_files(tmp_path, entries, (".py",)) == before

    (tmp_path / "guest/service.py").write_text("x = 2\n")
    assert cache.hash_files(tmp_path, entries, (".py",)) != before


def test_guest_code_hash_covers_the_guest_packages() -> None:
    assert GUEST_CODE == ("__init__.py", "errors.py", "ttrpc", "protos", "guest")
    assert len(cache.guest_code_hash()) == 64


class FakeBuild:
    """Replaces the slow steps (apt, assembling, compiling) with small stand-ins and counts builds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inputs = BASE
        self.builds = 0
        self.fail_in: str | None = None
        monkeypatch.setattr(builder, "gather_inputs", self.gather_inputs)
        monkeypatch.setattr(debian, "download", self.download)
        monkeypatch.setattr(debian, "extract", self.extract)
        monkeypatch.setattr(builder, "_install_kernel", self.install_kernel)
        monkeypatch.setattr(builder, "_install_userland", self.step("userland"))
        monkeypatch.setattr(builder, "_install_guest_code", self.step("guest code"))
        monkeypatch.setattr(builder, "_install_libraries", self.install_libraries)
        monkeypatch.setattr(builder, "_compile_python", self.compile_python)
        monkeypatch.setattr(builder, "_check_imports", self.check_imports)

    async def gather_inputs(self, flavour: str, compression: str) -> BuildInputs:
        return self.inputs

    async def download(self, packages: list[debian.Package], deb_dir: Path) -> list[Path]:
        return [deb_dir / p.deb_name() for p in packages]

    async def extract(self, deb: Path, dest: Path) -> None:
        os.makedirs(dest, exist_ok=True)

    def install_kernel(self, debroot: Path, rootfs: Path, kernel_out: Path) -> tuple[str, list[str]]:
        self.builds += 1
        kernel_out.write_bytes(b"kernel")
        (rootfs / "lib/modules").mkdir(parents=True)
        return "6.1.0-1-amd64", ["9p"]

    def step(self, name: str):  # type: ignore[no-untyped-def]
        def run(*args: object) -> None:
            if self.fail_in == name:
                raise ImageError(f"{name} failed on purpose")
        return run

    def install_libraries(self, debroot: Path, rootfs: Path) -> list[str]:
        self.step("libraries")()
        return ["_ssl"]

    async def compile_python(self, rootfs: Path) -> None:
        self.step("compile")()

    async def check_imports(self, rootfs: Path) -> None:
        self.step("imports")()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeBuild]:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    yield FakeBuild(monkeypatch)


def image_dirs() -> list[str]:
    return sorted(p.name for p in cache.image_root().iterdir() if p.is_dir())


async def test_first_build_is_recorded_as_current(fake: FakeBuild) -> None:
    assert installed_image() is None
    image = await build_image()
    assert image.key == BASE.key()
    assert image.kernel.read_bytes() == b"kernel"
    assert gzip.decompress(image.initrd.read_bytes()).startswith(b"070701")
    assert image.missing_modules == ("9p",)
    assert image.dropped_extensions == ("_ssl",)
    assert installed_image() == image
    manifest = json.loads((image.kernel.parent / cache.MANIFEST).read_text())
    assert manifest["inputs"]["guest_code_hash"] == BASE.guest_code_hash


async def test_unchanged_inputs_reuse_the_cached_image(fake: FakeBuild) -> None:
    first = await build_image()
    second = await build_image()
    assert fake.builds == 1
    assert second == first


async def test_force_rebuilds_in_place(fake: FakeBuild) -> None:
    first = await build_image()
    forced = await build_image(force=True)
    assert fake.builds == 2
    assert forced.kernel == first.kernel and forced.kernel.is_file()
    assert image_dirs() == [BASE.key()]


async def test_a_changed_input_builds_a_new_image_and_keeps_one_previous(fake: FakeBuild) -> None:
    keys = []
    for version in ("5.0.0", "5.0.1", "5.0.2"):
        fake.inputs = dataclasses.replace(BASE, protobuf_version=version)
        keys.append((await build_image()).key)
    assert fake.builds == 3
    assert len(set(keys)) == 3
    assert installed_image().key == keys[-1]  # type: ignore[union-attr]
    assert image_dirs() == sorted(keys[1:])


@pytest.mark.parametrize("failing_step", ["userland", "guest code", "libraries", "compile", "imports"])
async def test_a_failed_build_leaves_nothing_behind(fake: FakeBuild, failing_step: str) -> None:
    fake.fail_in = failing_step
    with pytest.raises(ImageError, match="failed on purpose"):
        await build_image()
    assert installed_image() is None
    assert sorted(p.name for p in cache.image_root().iterdir()) == [".lock"]


async def test_leftovers_of_a_killed_build_are_removed_by_the_next(fake: FakeBuild) -> None:
    root = cache.image_root()
    (root / ".build-abc-123/rootfs").mkdir(parents=True)
    (cache.cache_dir() / "debs/.partial-99").mkdir(parents=True)
    image = await build_image()
    assert sorted(p.name for p in root.iterdir()) == sorted([".lock", cache.CURRENT_RECORD, image.key])
    assert not (cache.cache_dir() / "debs/.partial-99").exists()


async def test_a_failed_rebuild_keeps_the_previous_image(fake: FakeBuild) -> None:
    good = await build_image()
    fake.inputs = dataclasses.replace(BASE, guest_code_hash="new" * 16)
    fake.fail_in = "compile"
    with pytest.raises(ImageError):
        await build_image()
    assert installed_image() == good
    assert image_dirs() == [good.key]


async def test_installed_image_ignores_a_record_whose_files_are_gone(fake: FakeBuild) -> None:
    image = await build_image()
    image.initrd.unlink()
    assert installed_image() is None


def test_installed_image_ignores_a_corrupt_record(fake: FakeBuild) -> None:
    cache.image_root().mkdir(parents=True)
    (cache.image_root() / cache.CURRENT_RECORD).write_text("{not json")
    assert installed_image() is None


async def test_progress_reports_every_step_in_order(fake: FakeBuild) -> None:
    seen: list[str] = []
    await build_image(progress=seen.append)
    # a Debian kernel skips building the custom one
    assert seen == [step for step in builder.STEPS if step != builder.STEPS[3]]


async def test_unknown_flavour_and_compression_are_refused() -> None:
    with pytest.raises(ImageError, match="unknown kernel flavour 'tiny'"):
        await builder.gather_inputs(flavour="tiny")
    with pytest.raises(ImageError, match="unknown initramfs compression 'bz2'"):
        await builder.gather_inputs(compression="bz2")


POLICY = """busybox-static:
  Installed: (none)
  Candidate: 1:1.35.0-4+b1
  Version table:
python3.11-minimal:
  Installed: 3.11.2-6
  Candidate: {python}
  Version table:
"""


async def test_resolve_runs_apt_update_once_when_the_lists_lack_a_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[list[str]] = []
    outputs = iter([POLICY.format(python="(none)"), "", POLICY.format(python="3.11.2-6+deb12u9")])

    async def fake_run(args: list[str], timeout: float, **kwargs: object) -> str:
        calls.append(args)
        return next(outputs)

    monkeypatch.setattr(debian, "run", fake_run)
    packages = await debian.resolve(["busybox-static", "python3.11-minimal"])
    assert packages == [debian.Package("busybox-static", "1:1.35.0-4+b1"),
                        debian.Package("python3.11-minimal", "3.11.2-6+deb12u9")]
    assert [c[:2] for c in calls] == [["apt-cache", "policy"], ["apt-get", "update"], ["apt-cache", "policy"]]
    assert packages[0].deb_name() == "busybox-static_1%3a1.35.0-4+b1_amd64.deb"


async def test_resolve_names_what_apt_cannot_find(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_run(args: list[str], timeout: float, **kwargs: object) -> str:
        return POLICY.format(python="(none)") if args[0] == "apt-cache" else ""

    monkeypatch.setattr(debian, "run", fake_run)
    with pytest.raises(ImageError, match=r"no installable version of python3\.11-minimal"):
        await debian.resolve(["busybox-static", "python3.11-minimal"])


async def test_a_failing_command_reports_its_output() -> None:
    with pytest.raises(ImageError, match=r"exit 3.*went wrong"):
        await debian.run(["sh", "-c", "echo went wrong >&2; exit 3"], timeout=10)


async def test_a_hanging_command_is_killed_at_its_timeout() -> None:
    with pytest.raises(ImageError, match="did not finish within"):
        await debian.run(["sleep", "30"], timeout=0.2)

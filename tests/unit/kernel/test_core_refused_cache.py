"""The per-boot memory of attach kinds the kernel refused (pytracer.kernel.core).
No kernel: the file and the boot key are what is under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytracer.kernel import core as loader


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run" / "refused-kinds.json"
    monkeypatch.setenv("PYTRACER_REFUSED_CACHE", str(path))
    return path


def test_refusals_are_remembered_for_the_same_object(cache: Path) -> None:
    loader.save_refused(b"object-a", {"fentry": "kernel refused it (Operation not permitted)"})
    assert loader.load_refused(b"object-a") == {"fentry": "kernel refused it (Operation not permitted)"}
    assert loader.load_refused(b"object-b") == {}  # another build of the programs: try again


def test_another_boot_or_kernel_forgets(cache: Path) -> None:
    loader.save_refused(b"obj", {"fentry": "refused"})
    data = json.loads(cache.read_text())
    for key, other in (("boot_id", "00000000-0000-0000-0000-000000000000"), ("release", "1.0.0")):
        cache.write_text(json.dumps({**data, key: other}))
        assert loader.load_refused(b"obj") == {}


@pytest.mark.parametrize("content", ["", "{", "[]", '{"refused": 3}', "\x00\xff"])
def test_a_damaged_file_never_breaks_start_up(cache: Path, content: str) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    assert loader.load_refused(b"obj") == {}


def test_unknown_kinds_are_ignored_and_unwritable_is_harmless(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loader.save_refused(b"obj", {"fentry": "refused", "made-up": "x"})
    assert loader.load_refused(b"obj") == {"fentry": "refused"}
    monkeypatch.setenv("PYTRACER_REFUSED_CACHE", "/proc/no/such/dir/file.json")
    loader.save_refused(b"obj", {"fentry": "refused"})  # no exception
    assert loader.load_refused(b"obj") == {}
    monkeypatch.setenv("PYTRACER_REFUSED_CACHE", "")
    assert loader.load_refused(b"obj") == {}

"""pipelines.lineage: DVC hashes of data folders (from dvc.lock, or computed as `dvc add` does)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.lineage import HASH_LIMIT_ENV, data_version, data_versions

DVC = [sys.executable, "-m", "dvc"]


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"episode bytes")
    (root / "sub" / "b.txt").write_text("more\n")
    return root


def test_a_folder_dvc_tracks_gets_the_hash_in_dvc_lock(tmp_path):
    _folder(tmp_path / "data" / "episodes")
    lock = {"schema": "2.0", "stages": {"collect": {"cmd": "x", "outs": [
        {"path": "data/episodes", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir", "size": 18,
         "nfiles": 2}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    version = data_version(tmp_path / "data" / "episodes")
    assert (version.md5, version.source, version.stage) == ("0123456789abcdef0123456789abcdef.dir", "dvc.lock",
                                                            "collect")
    assert version.tags()["dvc.nfiles"] == "2" and version.tags()["dvc.source"] == "dvc.lock"


def test_an_untracked_folder_is_hashed_as_dvc_add_hashes_it(tmp_path):
    folder = _folder(tmp_path / "outside" / "latents")
    version = data_version(folder)
    assert version.source == "computed" and version.nfiles == 2
    # the same folder added by DVC itself, in a project of its own
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run([*DVC, "init", "--no-scm", "-q"], cwd=project, check=True)
    _folder(project / "latents")
    subprocess.run([*DVC, "add", "-q", "latents"], cwd=project, check=True)
    recorded = yaml.safe_load((project / "latents.dvc").read_text())["outs"][0]["md5"]
    assert version.md5 == recorded and len(version.md5) == 36  # MLflow's dataset digest limit, exactly


def test_large_untracked_folders_get_a_listing_digest(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "big")
    monkeypatch.setenv(HASH_LIMIT_ENV, "0")
    version = data_version(folder)
    assert version.source == "listing" and version.md5.endswith(".lst")
    (folder / "a.bin").write_bytes(b"episode bytes, longer")  # another size: another digest
    assert data_version(folder).md5 != version.md5


def test_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        data_version(tmp_path / "nope")
    _folder(tmp_path / "episodes")
    assert list(data_versions(tmp_path)) == ["episodes"]  # prepared / latents absent: skipped

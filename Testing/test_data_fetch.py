"""Package conversion and validation (training/data/fetch.py) on tiny fake packages made here; no network."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.data import fetch as fetch_module
from training.data.fetch import DATASETS, FetchError, Package, fetch, is_complete
from training.data.label_protocols import LabelTableError, read_label_table, write_label_table

LAS = np.array([[-1.0, 0, 0, 10], [0, 1, 0, -20], [0, 0, 1, -5], [0, 0, 0, 1]])
"""A left-handed (LAS) 1 mm affine: conversion must flip it to RAS."""


def dataset(name: str):
    return next(d for d in DATASETS if d.name == name)


def nifti_bytes(tmp: Path, data: np.ndarray, affine: np.ndarray = LAS) -> bytes:
    path = tmp / "x.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.read_bytes()


def icbm_members(tmp: Path) -> dict[str, bytes]:
    """T1 (a ball), GM shell and WM core as uint8 probability × 255 on 12³."""
    g = np.indices((12, 12, 12)) - 5.5
    r = np.sqrt((g ** 2).sum(0))
    t1 = np.where(r < 5, 100, 0).astype(np.uint8)
    wm = np.where(r < 2.5, 255, 0).astype(np.uint8)
    gm = np.where((r >= 3.5) & (r < 5), 230, 0).astype(np.uint8)
    members = dict(zip(dataset("icbm152_2009a").members, (t1, gm, wm)))
    return {m: nifti_bytes(tmp, d) for m, d in members.items()}


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def wheel_downloader(members: dict[str, bytes], calls: list):
    def download(package: Package, folder: Path) -> Path:
        calls.append(package.name)
        folder.mkdir(parents=True, exist_ok=True)
        return make_wheel(folder / f"{package.name}-1.0-py3-none-any.whl", members)

    return download


def test_icbm_conversion_manifest_and_idempotence(tmp_path):
    calls: list = []
    download = wheel_downloader(icbm_members(tmp_path), calls)
    fetch(tmp_path / "out", ["icbm152_2009a"], downloader=download, log=lambda s: None)
    out = tmp_path / "out" / "icbm152_2009a"
    t1 = nib.load(str(out / "t1.nii.gz"))
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S") and t1.get_data_dtype() == np.float32
    tissue = nib.load(str(out / "tissue.nii.gz"))
    assert tissue.get_data_dtype() == np.int16
    values = np.asanyarray(tissue.dataobj)
    assert set(np.unique(values)) == {0, 1, 2, 3} and read_label_table(out / "tissue.tsv") == {1: "CSF", 2: "GM", 3: "WM"}
    assert values[6, 6, 6] == 3  # WM core
    assert (out / "LICENSE-ICBM152.txt").read_text().startswith("MNI ICBM152")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert manifest["images"]["t1.nii.gz"]["shape"] == [12, 12, 12]
    assert not list((tmp_path / "out").glob(".fetch-*"))

    fetch(tmp_path / "out", ["icbm152_2009a"], downloader=download, log=lambda s: None)
    assert calls == ["nilearn"]  # second call skipped: outputs verified by sha256
    (out / "gm.nii.gz").write_bytes(b"tampered")
    assert not is_complete(out)
    fetch(tmp_path / "out", ["icbm152_2009a"], downloader=download, log=lambda s: None)
    assert calls == ["nilearn", "nilearn"] and is_complete(out)


def test_missing_member_names_package_and_file(tmp_path):
    members = icbm_members(tmp_path)
    gm = dataset("icbm152_2009a").members[1]
    del members[gm]
    with pytest.raises(FetchError, match=rf"pypi package 'nilearn'.*{gm}.*missing"):
        fetch(tmp_path / "out", ["icbm152_2009a"], downloader=wheel_downloader(members, []), log=lambda s: None)
    assert not (tmp_path / "out" / "icbm152_2009a").exists()
    assert not list((tmp_path / "out").glob(".fetch-*"))  # partial work cleaned up


def test_corrupt_member_and_corrupt_wheel(tmp_path):
    members = icbm_members(tmp_path)
    t1 = dataset("icbm152_2009a").members[0]
    members[t1] = members[t1][:40]  # truncated gzip
    with pytest.raises(FetchError, match=rf"'nilearn'.*{t1}.*corrupt"):
        fetch(tmp_path / "out", ["icbm152_2009a"], downloader=wheel_downloader(members, []), log=lambda s: None)

    def bad_wheel(package: Package, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nilearn-1.0-py3-none-any.whl").write_bytes(b"not a zip")
        return folder / "nilearn-1.0-py3-none-any.whl"

    with pytest.raises(FetchError, match="nilearn-1.0-py3-none-any.whl is corrupt"):
        fetch(tmp_path / "out", ["icbm152_2009a"], downloader=bad_wheel, log=lambda s: None)


def test_download_failure_names_registry_and_package(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for nilearn")

    monkeypatch.setattr(fetch_module.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match=r"could not download pypi package 'nilearn'.*No matching distribution"):
        fetch_module.download(Package("pypi", "nilearn"), tmp_path)
    with pytest.raises(FetchError, match=r"debian package 'mricron-data'.*apt-get download"):
        fetch_module.download(Package("debian", "mricron-data"), tmp_path)


def test_fsaverage_unknown_aseg_id_is_an_error(tmp_path):
    base = "smriprep_freesurfer732/freesurfer/subjects/fsaverage6/mri/"
    image = np.zeros((6, 6, 6), np.float32)
    image[2:4, 2:4, 2:4] = 50.0
    aseg = np.zeros((6, 6, 6), np.float32)
    aseg[1, 1, 1], aseg[2, 2, 2], aseg[3, 3, 3] = 17, 53, 999
    members = {}
    for name, data in (("T1", image), ("brain", image), ("aseg", aseg)):
        path = tmp_path / f"{name}.mgz"
        nib.save(nib.MGHImage(data, LAS), str(path))
        members[base + f"{name}.mgz"] = path.read_bytes()
    with pytest.raises(FetchError, match=r"aseg.mgz has ids without a FreeSurferColorLUT name.*\[999\]"):
        fetch(tmp_path / "out", ["fsaverage"], downloader=wheel_downloader(members, []), log=lambda s: None)
    aseg[3, 3, 3] = 0
    nib.save(nib.MGHImage(aseg, LAS), str(tmp_path / "aseg.mgz"))
    members[base + "aseg.mgz"] = (tmp_path / "aseg.mgz").read_bytes()
    fetch(tmp_path / "out", ["fsaverage"], downloader=wheel_downloader(members, []), log=lambda s: None)
    out = tmp_path / "out" / "fsaverage"
    assert read_label_table(out / "aseg.tsv") == {17: "Left-Hippocampus", 53: "Right-Hippocampus"}
    labels = nib.load(str(out / "aseg.nii.gz"))
    assert nib.aff2axcodes(labels.affine) == ("R", "A", "S") and labels.get_data_dtype() == np.int16


def test_colin27_from_a_deb_and_aal_table_mismatch(tmp_path):
    base = "usr/share/mricron/templates/"
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: mricron-data\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n")
    (root / base).mkdir(parents=True)
    aal = np.zeros((5, 5, 5), np.uint8)
    aal[1, 1, 1], aal[2, 2, 2] = 37, 38
    for name, data in (("ch2", np.full((5, 5, 5), 7, np.uint8)), ("ch2bet", np.ones((5, 5, 5), np.uint8)),
                       ("aal", aal)):
        nib.save(nib.Nifti1Image(data, LAS), str(root / base / f"{name}.nii.gz"))
    (root / base / "aal.nii.txt").write_text("37 Hippocampus_L 4101\n38 Hippocampus_R 4102\n39 Extra 1\n")
    deb = tmp_path / "mricron-data_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True)

    def download(package: Package, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(deb, folder))

    with pytest.raises(LabelTableError, match=r"aal.nii.gz.*not the map \[39\]"):
        fetch(tmp_path / "out", ["colin27"], downloader=download, log=lambda s: None)
    (root / base / "aal.nii.txt").write_text("37 Hippocampus_L 4101\n38 Hippocampus_R 4102\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True)
    fetch(tmp_path / "out", ["colin27"], downloader=download, log=lambda s: None)
    out = tmp_path / "out" / "colin27"
    ch2 = nib.load(str(out / "ch2.nii.gz"))
    assert ch2.get_data_dtype() == np.float32 and nib.aff2axcodes(ch2.affine) == ("R", "A", "S")
    assert read_label_table(out / "aal.tsv") == {37: "Hippocampus_L", 38: "Hippocampus_R"}


def test_label_table_roundtrip_and_parse_error(tmp_path):
    write_label_table(tmp_path / "t.tsv", {2: "GM", 1: "CSF"})
    assert (tmp_path / "t.tsv").read_text() == "id\tname\n1\tCSF\n2\tGM\n"
    assert read_label_table(tmp_path / "t.tsv") == {1: "CSF", 2: "GM"}
    (tmp_path / "bad.tsv").write_text("1 CSF\n")
    with pytest.raises(LabelTableError, match="bad.tsv:1"):
        read_label_table(tmp_path / "bad.tsv")


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(FetchError, match="unknown dataset"):
        fetch(tmp_path, ["nope"], log=lambda s: None)

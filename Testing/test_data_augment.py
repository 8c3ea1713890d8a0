"""More anatomy and realistic warps without downloads: SynthMorph-style label maps (labelsynth), the head CT
(head), the field bank (fieldbank). Phantoms only; the bank is a tiny one written here."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.geometry import Grid
from training.data import head, labelsynth, synth
from training.data.fieldbank import FieldBank, bank_grid, bank_record, log_field
from training.data.phantom import ellipsoid_labels
from DeepRegistrationLib.methods.models import sha256_of

SHAPE = (24, 24, 24)


def test_synthesised_label_maps_are_new_partitions_of_known_ids():
    a = ellipsoid_labels((16, 16, 16))
    b = torch.where(a == 2, 3, torch.where(a == 3, 2, a))  # a second 'subject' with its blobs swapped
    maps = labelsynth.offset_labels([a, b])
    assert set(torch.unique(maps[1]).tolist()) == {0, 1001, 1002, 1003, 1004}
    first = labelsynth.synthesise_labels(maps, 7, warp_mm=4.0)
    again = labelsynth.synthesise_labels(maps, 7, warp_mm=4.0)
    other = labelsynth.synthesise_labels(maps, 8, warp_mm=4.0)
    assert torch.equal(first, again) and not torch.equal(first, other)
    known = set(torch.unique(maps[0]).tolist()) | set(torch.unique(maps[1]).tolist())
    for new in (first, other):
        assert set(torch.unique(new).tolist()) <= known and new.shape == a.shape
        assert not any(torch.equal(new, m) for m in maps)
    mixed = [labelsynth.synthesise_labels(maps, s, warp_mm=4.0, mix=1.0) for s in range(2)]
    assert any({v // 1000 for v in torch.unique(m).tolist() if v} == {0, 1} for m in mixed), "no left–right mix"


def test_structure_wise_morphology_grows_and_shrinks_labels():
    labels = ellipsoid_labels(SHAPE)
    sizes = {v: int((labels == v).sum()) for v in (2, 3)}
    changes = set()
    for seed in range(6):
        out = labelsynth.morph_labels(labels, torch.Generator().manual_seed(seed), morph=0.3)
        for v in (2, 3):
            changes.add(int(np.sign(int((out == v).sum()) - sizes[v])))
    assert {-1, 1} <= changes


def test_synth_pair_has_exact_ground_truth():
    maps = labelsynth.offset_labels([ellipsoid_labels((16, 16, 16))])
    pair = labelsynth.synth_pair(maps, seed=3, magnitude_mm=3.0)
    assert pair.fixed.shape == pair.moving.shape == (1, 1, 16, 16, 16)
    back = warp.warp_labels(pair.moving_labels, pair.displacement)
    inner = (slice(None), slice(None), *(slice(3, -3),) * 3)
    assert float((back[inner] == pair.fixed_labels[inner]).float().mean()) > 0.97


def _head_phantom(n=40):
    g = warp.identity_grid((n, n, n))[0]
    r = ((g - (n - 1) / 2) ** 2).sum(0).sqrt()
    t1 = torch.zeros(n, n, n)
    t1[r < 18] = 0.7  # scalp
    t1[r < 15] = 0.05  # skull (dark on T1)
    t1[r < 13] = 0.2  # CSF
    t1[r < 12] = 0.5  # GM
    t1[r < 8] = 0.8  # WM
    tissue = torch.zeros(n, n, n, dtype=torch.int16)
    tissue[r < 12] = 2
    tissue[r < 8] = 3
    return t1.numpy(), tissue.numpy(), r.numpy()


def test_head_tissue_map_finds_bone_scalp_and_air():
    t1, tissue, r = _head_phantom()
    m = head.head_tissue_map(t1, tissue, spacing_mm=1.0, csf_mm=1.5)
    assert m[r > 19].max() == 0  # air
    assert (m[(r > 15.5) & (r < 17.5)] == 5).mean() > 0.9  # scalp
    assert (m[(r > 13.5) & (r < 14.5)] == 4).mean() > 0.9  # bone
    assert (m[(r > 12.2) & (r < 12.8)] == 1).mean() > 0.9  # CSF next to the brain
    assert (m[r < 7] == 3).all() and (m[(r > 9) & (r < 11)] == 2).all()


def test_rendered_head_ct_has_realistic_hounsfield_units():
    t1, tissue, r = _head_phantom()
    m = head.head_tissue_map(t1, tissue, spacing_mm=1.0, csf_mm=1.5)
    grid = Grid.from_spacing(m.shape, (1.0,) * 3, (0.0, 0.0, 0.0), np.eye(3))
    fractions = head.class_fractions(m, grid, grid)
    assert torch.allclose(fractions.sum(1), torch.ones(1, *m.shape))
    for seed in range(3):
        ct = head.render_ct(fractions, torch.Generator().manual_seed(seed))[0, 0].numpy()
        assert np.median(ct[r > 19]) < -950
        assert 600 < np.median(ct[(r > 13.6) & (r < 14.4)]) < 1600
        assert 30 < np.median(ct[(r > 9) & (r < 11)]) < 50 and 20 < np.median(ct[r < 6]) < 35
    pair = head.head_pair(torch.from_numpy(t1)[None, None], fractions, seed=1, magnitude_mm=3.0)
    assert pair.fixed.min() < -900 and pair.fixed.max() > 600 and set(torch.unique(pair.fixed_labels).tolist()) == {0, 1, 2, 3}


def test_log_field_inverts_the_exponential():
    v = synth.random_velocity((16, 16, 16), torch.Generator().manual_seed(0), (1.0,) * 3, 3.0)
    u = warp.integrate_velocity(v)
    w, residual = log_field(u)
    assert residual < 0.01 and float((w - v).abs().max()) < 0.05


def test_field_bank_draws_and_its_record(tmp_path):
    grid = bank_grid(16.0)
    v = synth.random_velocity(grid.shape, torch.Generator().manual_seed(0), (16.0,) * 3, 8.0)
    v_mm = (v[0] * 16.0).permute(1, 2, 3, 0).numpy()
    nib.save(nib.Nifti1Image(v_mm.astype(np.float32), grid.affine), str(tmp_path / "a__b.nii.gz"))
    manifest = {"grid": {"shape": list(grid.shape), "affine": grid.affine.tolist()}, "sources": {"a": {"t1": "1" * 64}},
                "fields": [{"file": "a__b.nii.gz", "sha256": sha256_of(tmp_path / "a__b.nii.gz")}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    bank = FieldBank(tmp_path, 8.0, (16, 16, 16))
    first = bank.velocity(torch.Generator().manual_seed(1), (1.0, 1.0), 0.0)
    again = bank.velocity(torch.Generator().manual_seed(1), (1.0, 1.0), 0.0)
    assert first.shape == (1, 3, 16, 16, 16) and torch.equal(first, again)
    assert 0.2 < float(first.norm(dim=1).amax()) * 8.0 / 8.0 < 2.0  # peak about 8 mm at 8 mm voxels
    record = bank_record(tmp_path)
    assert record["sources"] == {"a": {"t1": "1" * 64}} and "a__b.nii.gz" in record["fields"]
    (tmp_path / "a__b.nii.gz").write_bytes(b"changed")
    with pytest.raises(InputError, match="changed since the bank was built"):
        bank_record(tmp_path)
    with pytest.raises(InputError, match="no field bank"):
        bank_record(tmp_path / "nothing")

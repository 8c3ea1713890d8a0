"""Held-out evaluation: the data manifest proves the hold-out, a leak is caught before training, the shipped models
hold out what their records claim, and the benchmark reports per network the pairs whose anatomy it never saw."""

from __future__ import annotations

import json

import pytest

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.methods.models import read_metadata
from DeepRegistrationLib.methods.registry import METHODS
from benchmark.heldout import held_out_for, held_out_pairs, model_hashes
from benchmark.methods import CANDIDATE, available_methods, network_method
from benchmark.run import summary_markdown
from benchmark.suite import SUITE_V1_PATH, load_manifest
from training.provenance import data_manifest, leaks, training_hashes
from training.recipe import Recipe

SHIPPED = sorted(name for name, spec in METHODS.items() if spec.weights_path.is_file())
RECORDS = {name: read_metadata(METHODS[name].weights_path)["record"] for name in SHIPPED}


def _fake_anatomy(root, subjects: dict[str, dict[str, bytes]]):
    for name, files in subjects.items():
        folder = root / name
        folder.mkdir(parents=True)
        for file, content in files.items():
            (folder / file).write_bytes(content)
        (folder / "manifest.json").write_text(json.dumps({"files": {f: "" for f in files}}))


def _recipe(anatomy, **data):
    return Recipe.from_dict({"method": "voxelmorph", "config": {"working_shape": [16, 16, 16]}, "iterations": 1,
                             "data": {"kind": "known_warp", "anatomy_dir": str(anatomy), **data}})


def test_data_manifest_records_training_and_held_out_hashes(tmp_path):
    _fake_anatomy(tmp_path, {"a": {"t1.nii.gz": b"A"}, "b": {"t1.nii.gz": b"B"}, "c": {"t1.nii.gz": b"C"}})
    manifest = data_manifest(_recipe(tmp_path, subjects=["a", "b"], held_out=["c"]))
    assert set(manifest) == {"spec", "a", "b", "held_out"} and set(manifest["held_out"]) == {"c"}
    assert manifest["held_out"]["c"]["t1.nii.gz"] not in training_hashes(manifest)
    assert leaks(manifest) == []


def test_a_leak_and_a_missing_held_out_subject_stop_before_compute(tmp_path):
    _fake_anatomy(tmp_path, {"a": {"t1.nii.gz": b"A"}, "b": {"t1.nii.gz": b"B"}, "c": {"copy.nii.gz": b"A"}})
    with pytest.raises(InputError, match="held-out subject 'colin28': no fetch manifest"):
        data_manifest(_recipe(tmp_path, subjects=["a", "b"], held_out=["colin28"]))
    with pytest.raises(InputError, match="held-out anatomy would be trained on: c/copy.nii.gz is also a/t1.nii.gz"):
        data_manifest(_recipe(tmp_path, subjects=["a", "b"], held_out=["c"]))
    with pytest.raises(InputError, match="both held out and trained on"):
        _recipe(tmp_path, subjects=["a", "c"], held_out=["c"])


def test_a_synthetic_record_with_a_leak_is_caught():
    """The check the shipped-model test applies, on a record whose 'icbm' files include one of colin27's."""
    colin = {"ch2bet.nii.gz": "1" * 64, "aal.nii.gz": "2" * 64}
    record = {"data": {"spec": {"held_out": ["colin27"]}, "icbm": {"t1.nii.gz": "3" * 64, "x.nii.gz": "2" * 64},
                       "held_out": {"colin27": colin}}}
    assert leaks(record["data"]) == [("colin27", "aal.nii.gz", "icbm/x.nii.gz")]
    assert leaks({**record["data"], "icbm": {"t1.nii.gz": "3" * 64}}) == []
    manifest = load_manifest()
    colin_only = [s for s in manifest.pairs.values() if set(s.subjects) <= {"colin27", "colin27_head"}]
    hashes = lambda s: set(colin.values()) if s.startswith("colin27") else {"3" * 64}  # noqa: E731
    assert held_out_for(model_hashes(record), colin_only, hashes) == []  # the leak also hides the pairs
    clean = {"data": {**record["data"], "icbm": {"t1.nii.gz": "3" * 64}}}
    assert held_out_for(model_hashes(clean), colin_only, hashes) == [s.id for s in colin_only]


def _colin27_hashes() -> set[str]:
    """Colin27's file hashes as every shipped record knows them (held out or trained on)."""
    out = set()
    for record in RECORDS.values():
        data = record.get("data", {})
        out |= set(data.get("colin27", {}).values()) | set(data.get("held_out", {}).get("colin27", {}).values())
    return out


def test_every_shipped_model_that_holds_out_colin27_never_saw_it():
    """The rule for every file in Resources/Models: a record whose data spec holds out Colin27 lists Colin27's
    files, and none of their hashes (nor any Colin27 hash another record knows) is among its training hashes.
    Today's models were trained before the hold-out (their records say so); the retrained ones must pass."""
    checked = []
    for name in SHIPPED:
        data = RECORDS[name].get("data", {})
        if "colin27" not in data.get("spec", {}).get("held_out", []):
            continue
        assert data.get("held_out", {}).get("colin27"), f"{name}: the record lists no Colin27 files"
        known = _colin27_hashes() | set(data["held_out"]["colin27"].values())
        assert leaks(data, {"colin27": {f"file{i}": h for i, h in enumerate(sorted(known))}}) == [], name
        checked.append(name)
    untrained_on_rule = [n for n in SHIPPED if n not in checked]
    assert all("held_out" not in RECORDS[n]["data"]["spec"] for n in untrained_on_rule)


def _recorded_subject_hashes(manifest):
    """subject → its files' hashes as recorded in the shipped models (the fetch is deterministic)."""
    def hashes(subject: str) -> set[str]:
        folder = manifest.subjects[subject]["image"].split("/")[0]
        out = set()
        for record in RECORDS.values():
            data = record.get("data", {})
            out |= set(data.get(folder, {}).values()) | set(data.get("held_out", {}).get(folder, {}).values())
        return out
    return hashes


@pytest.mark.parametrize("path", [None, SUITE_V1_PATH])
def test_held_out_pairs_of_todays_models(path):
    """Models trained on all three subjects have no held-out pair; a model that held out Colin27 has every
    Colin27-only pair; one trained on ICBM152 alone (today's macjnet) has exactly the pairs without ICBM152."""
    manifest = load_manifest(path) if path else load_manifest()
    specs = list(manifest.pairs.values())
    methods = [network_method(n) for n in SHIPPED]
    held = held_out_pairs(manifest, specs, methods, anatomy_dir=None, records=RECORDS,
                          subject_hashes=_recorded_subject_hashes(manifest))
    for method in methods:
        spec = RECORDS[method.name]["data"]["spec"]
        trained = {s.split("_")[0] for s in spec["subjects"]}  # icbm152, colin27, fsaverage
        applicable = [s for s in specs if method.applies_to(s)]
        expected = [s.id for s in applicable if not trained & {x.split("_")[0] for x in s.subjects}]
        assert held[method.name] == expected, method.name
        if {"icbm152", "colin27", "fsaverage"} <= trained:
            assert held[method.name] == [], f"{method.name} saw every subject"
        if "colin27" in spec.get("held_out", []):
            assert {s.id for s in applicable if set(s.subjects) <= {"colin27", "colin27_head"}} <= set(held[method.name])


def test_summary_reports_held_out_rows_separately():
    records = [{"pair": p, "kind": "known_warp", "method": m, "error": "", "dice": d, "hd95": 1.0, "assd": 0.5,
                "folding_pct": 0.0, "sdlogj": 0.1, "tre_mm": 1.0, "epe_mm": 1.0, "seconds": 1.0, "peak_mb": 10.0}
               for p, m, d in [("kw_a", "identity", 0.5), ("kw_a", "lapirn", 0.8), ("kw_b", "identity", 0.6),
                               ("kw_b", "lapirn", 0.9)]]
    info = {"held_out": {"lapirn": ["kw_b"]}, "resolution_mm": 2.0, "started": "", "finished": "",
            "machine": {"cpu": "cpu", "cores": 2, "threads": 1, "versions": {}}}
    text = summary_markdown(records, info)
    section = text[text.index("### Held-out anatomy"):text.index("### Per pair")]
    assert "Pairs whose anatomy lapirn never saw: kw_b." in section
    assert "| lapirn | 1 | 0.900 |" in section and "| identity | 1 | 0.600 |" in section
    none = summary_markdown(records, {**info, "held_out": {"lapirn": []}})
    assert "No network has a held-out pair" in none


def test_v1_stays_readable_and_v2_adds_ct_pairs_in_both_directions():
    v1, v2 = load_manifest(SUITE_V1_PATH), load_manifest()
    assert v1.version == 1 and v2.version == 2 and set(v1.pairs) < set(v2.pairs)
    ct = v2.select(["ct_mr"])
    assert {s.modalities for s in ct} == {("ct", "mr"), ("mr", "ct")}
    assert all(s.multimodal for s in ct)
    assert [m.name for m in available_methods(v2, ["identity"])] == ["identity"]


def _candidate(tmp_path, record: dict, method: str = "voxelmorph"):
    from DeepRegistrationLib.methods.models import save_model
    from DeepRegistrationLib.methods.registry import get_method

    return save_model(get_method(method).build(), method, tmp_path / f"{method}.safetensors", record)


def test_a_candidate_model_runs_beside_the_shipped_one_with_its_own_held_out_pairs(tmp_path):
    """`--candidate voxelmorph=FILE`: methods voxelmorph[candidate] (fast, @balanced) carry the file and its
    sha256, and their held-out pairs come from the candidate's record (here: trained on ICBM152 only)."""
    from benchmark.methods import parse_candidates

    manifest = load_manifest()
    icbm = {"data": {"spec": {"subjects": ["icbm152_2009a"]}, "icbm152_2009a": {"t1.nii.gz": "3" * 64}}}
    path = _candidate(tmp_path, icbm)
    methods = available_methods(manifest, ["voxelmorph[candidate]", "voxelmorph[candidate]@balanced"],
                                parse_candidates([f"voxelmorph={path}"]))
    assert [m.settings["preset"] for m in methods] == ["fast", "balanced"]
    assert all(m.weights == str(path.resolve()) and len(m.settings["weights_sha256"]) == 64 for m in methods)
    specs = list(manifest.pairs.values())
    hashes = lambda s: {"3" * 64} if s.startswith("icbm152") else {s}  # noqa: E731
    held = held_out_pairs(manifest, specs, methods, anatomy_dir=None, subject_hashes=hashes)
    expected = [s.id for s in specs if methods[0].applies_to(s) and not any(x.startswith("icbm152")
                                                                           for x in s.subjects)]
    assert held["voxelmorph[candidate]"] == expected and expected


@pytest.mark.parametrize("values, message", [
    (["voxelmorph"], "expected NAME=PATH"), (["optimise=x.safetensors"], "not a registry network"),
    (["voxelmorph=missing.safetensors"], "does not exist"), (["lapirn={path}"], "is a voxelmorph model, not a lapirn"),
    (["voxelmorph={path}", "voxelmorph={path}"], "'voxelmorph' is given twice")])
def test_a_bad_candidate_is_named_before_any_run(tmp_path, values, message):
    from benchmark.methods import parse_candidates

    path = _candidate(tmp_path, {})
    with pytest.raises(InputError, match=message):
        parse_candidates([value.format(path=path) for value in values])


def test_summary_says_whether_a_candidate_beats_the_shipped_model_on_its_held_out_pairs():
    rows = [("kw_a", "identity", 0.5), ("kw_a", "lapirn", 0.8), ("kw_a", "lapirn[candidate]", 0.7),
            ("kw_b", "identity", 0.6), ("kw_b", "lapirn", 0.7), ("kw_b", "lapirn[candidate]", 0.9),
            ("kw_b", "lapirn@balanced", 0.95), ("kw_b", "lapirn[candidate]@balanced", 0.94)]
    records = [{"pair": p, "kind": "known_warp", "method": m, "error": "", "dice": d, "hd95": 1.0, "assd": 0.5,
                "folding_pct": 0.0, "sdlogj": 0.1, "tre_mm": 1.0, "epe_mm": 1.0, "seconds": 1.0, "peak_mb": 10.0}
               for p, m, d in rows]
    info = {"held_out": {"lapirn": [], "lapirn[candidate]": ["kw_b"], "lapirn@balanced": [],
                         "lapirn[candidate]@balanced": ["kw_b"]},
            "resolution_mm": 2.0, "started": "", "finished": "",
            "machine": {"cpu": "cpu", "cores": 2, "threads": 1, "versions": {}}}
    text = summary_markdown(records, info)
    section = text[text.index("### Candidate models"):text.index("### Per pair")]
    assert ("| lapirn[candidate] | lapirn | 1 | 0.900 | 0.700 | +0.200 | 0.600 | beats (the shipped model trained on "
            "this anatomy) |") in section
    assert "| lapirn[candidate]@balanced | lapirn@balanced | 1 | 0.940 | 0.950 | -0.010 | 0.600 | does not beat |" \
        in section
    assert "### Candidate models" not in summary_markdown(records[:2], info)


@pytest.mark.parametrize("shipped_held, candidate, verdict", [
    (["kw_b"], 0.64, "does not beat"),
    ([], 0.64, "replaces: the shipped model trained on this anatomy, so it has no held-out row; the candidate meets "
               "identity + 0.03"),
    ([], 0.62, "does not beat: the shipped model trained on this anatomy, so it has no held-out row; the candidate "
               "misses identity + 0.03")])
def test_a_fast_candidate_is_judged_by_the_identity_target_where_the_shipped_model_saw_the_anatomy(
        shipped_held, candidate, verdict):
    """A shipped model that trained on the anatomy of the candidate's held-out pairs scores memory there: a `fast`
    candidate below it replaces it if it is identity + 0.03 or better; against a held-out shipped model the plain
    comparison stands."""
    rows = [("kw_b", "identity", 0.6), ("kw_b", "mmln", 0.7), ("kw_b", "mmln[candidate]", candidate)]
    records = [{"pair": p, "kind": "known_warp", "method": m, "error": "", "dice": d, "hd95": 1.0, "assd": 0.5,
                "folding_pct": 0.0, "sdlogj": 0.1, "tre_mm": 1.0, "epe_mm": 1.0, "seconds": 1.0, "peak_mb": 10.0}
               for p, m, d in rows]
    info = {"held_out": {"mmln": shipped_held, "mmln[candidate]": ["kw_b"]}, "resolution_mm": 2.0, "started": "",
            "finished": "", "machine": {"cpu": "cpu", "cores": 2, "threads": 1, "versions": {}}}
    text = summary_markdown(records, info)
    assert f"| 0.600 | {verdict} |" in text[text.index("### Candidate models"):text.index("### Per pair")]
    if not shipped_held:  # without the identity's row there is nothing to judge the candidate by
        text = summary_markdown(records[1:], info)
        assert "| – | does not beat: the shipped model trained on this anatomy, so it has no held-out row; run " \
            "identity to judge the candidate by identity + 0.03 |" in text


def test_a_resumed_run_refuses_records_made_with_another_candidate_file(tmp_path):
    from benchmark.run import _check_same_methods

    manifest = load_manifest()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = _candidate(tmp_path / "a", {}), _candidate(tmp_path / "b", {})
    before = available_methods(manifest, ["voxelmorph[candidate]"], {"voxelmorph": first})
    after = available_methods(manifest, ["voxelmorph[candidate]"], {"voxelmorph": second})
    _check_same_methods([m.to_dict() for m in before], before, tmp_path)
    with pytest.raises(InputError, match="cannot resume: voxelmorph\\[candidate\\] ran with other settings"):
        _check_same_methods([m.to_dict() for m in before], after, tmp_path)


def test_a_candidate_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    """The three presets of one candidate read its sha256 once; a file rewritten in place is hashed again."""
    import benchmark.methods as bm
    from DeepRegistrationLib.methods.models import sha256_of

    path = _candidate(tmp_path, {})
    calls = []
    monkeypatch.setattr(bm, "sha256_of", lambda p: calls.append(p) or sha256_of(p))
    names = ["voxelmorph[candidate]", "voxelmorph[candidate]@balanced", "voxelmorph[candidate]@balanced-half"]
    first = available_methods(load_manifest(), names, {"voxelmorph": path})
    assert len(calls) == 1 and {m.settings["weights_sha256"] for m in first} == {sha256_of(path)}
    path.write_bytes(path.read_bytes() + b" ")
    second = available_methods(load_manifest(), names[:1], {"voxelmorph": path})
    assert len(calls) == 2 and second[0].settings["weights_sha256"] == sha256_of(path)


def test_a_balanced_candidate_row_is_judged_over_the_refinement_seeds_that_were_run():
    """`NAME@balanced-seedK` runs balanced with refinement seed K; with seeds 1 and 2 beside the preset's own, the
    candidate's `@balanced` row is the mean over pairs and seeds, and a candidate below by less than the shipped
    model's seed-to-seed standard deviation ties."""
    from DeepRegistrationLib.engine.refine_settings import preset_settings
    from benchmark.methods import REFINE_SEEDS, SEEDED, network_options

    assert REFINE_SEEDS == (1, 2)
    (method,) = available_methods(load_manifest(), [f"lapirn@{SEEDED}2"])
    options = network_options(method, ("mr", "mr"), "cpu", None)
    assert options.preset == "balanced" and preset_settings(options.preset, options.refinement).seed == 2
    shipped = {"": 0.950, "-seed1": 0.952, "-seed2": 0.948}  # per-seed means 0.950 ± 0.002
    rows = [("kw_b", "identity", 0.6)]
    rows += [("kw_b", f"lapirn@balanced{k}", d) for k, d in shipped.items()]
    rows += [("kw_b", f"lapirn[candidate]@balanced{k}", d - 0.001) for k, d in shipped.items()]
    records = [{"pair": p, "kind": "known_warp", "method": m, "error": "", "dice": d, "hd95": 1.0, "assd": 0.5,
                "folding_pct": 0.0, "sdlogj": 0.1, "tre_mm": 1.0, "epe_mm": 1.0, "seconds": 1.0, "peak_mb": 10.0}
               for p, m, d in rows]
    info = {"held_out": {m: ["kw_b"] for _, m, _ in rows if CANDIDATE in m},
            "resolution_mm": 2.0, "started": "", "finished": "",
            "machine": {"cpu": "cpu", "cores": 2, "threads": 1, "versions": {}}}

    def section(recs):
        text = summary_markdown(recs, info)
        return text[text.index("### Candidate models"):text.index("### Per pair")]

    text = section(records)
    assert ("| lapirn[candidate]@balanced | lapirn@balanced | 1 | 0.949 | 0.950 | -0.001 | 0.600 | tie (Δ -0.0010, "
            "seed spread 0.0020, 3 seeds) |") in text
    assert "seed1 |" not in text  # the seeded runs are folded into the @balanced row
    worse = [{**r, "dice": r["dice"] - 0.004} if "[candidate]" in r["method"] else r for r in records]
    assert "| does not beat (Δ -0.0050, seed spread 0.0020, 3 seeds) |" in section(worse)
    alone = [r for r in records if "seed" not in r["method"]]
    assert "| -0.001 | 0.600 | does not beat |" in section(alone)

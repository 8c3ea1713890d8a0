"""The extension as the Extensions Index and a user see it: licence, metadata in CMakeLists.txt, the index entry, what
the build installs beside the module."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cmake_value(name: str) -> str:
    return re.search(rf'set\({name} "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text()).group(1)


def test_licence_is_the_bsd_3_clause_that_pyproject_declares():
    text = (ROOT / "LICENSE.txt").read_text()
    assert text.startswith("BSD 3-Clause License") and "Neither the name of the copyright holder" in text
    assert 'license = { text = "BSD-3-Clause" }' in (ROOT / "pyproject.toml").read_text()
    assert "LICENSE-ICBM152.txt" in text and (ROOT / "Resources" / "SampleData" / "LICENSE-ICBM152.txt").is_file()


def test_extension_metadata_depends_on_pytorch_and_names_contributors_with_organisation():
    assert cmake_value("EXTENSION_DEPENDS") == "PyTorch"
    assert cmake_value("EXTENSION_CATEGORY") == "Registration"
    contributors = [c.strip() for c in cmake_value("EXTENSION_CONTRIBUTORS").split(",")]
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in contributors), contributors
    assert cmake_value("EXTENSION_ICONURL").endswith("DeepRegistration/Resources/Icons/DeepRegistration.png")
    assert len(cmake_value("EXTENSION_SCREENSHOTURLS").split()) >= 3


def test_extensions_index_entry():
    entry = json.loads((ROOT / "DeepRegistration.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == cmake_value("EXTENSION_CATEGORY")
    assert entry["scm_url"].startswith(cmake_value("EXTENSION_HOMEPAGE")) and entry["scm_revision"] == "main"
    assert entry["build_subdirectory"] == "."


def test_the_build_installs_the_sample_pair_and_the_weights_beside_the_module():
    cmake = (ROOT / "DeepRegistration" / "CMakeLists.txt").read_text()
    assert "set(MODULE_DATA_SETS SampleData)" in cmake and "list(APPEND MODULE_DATA_SETS Models)" in cmake
    assert "option(DEEPREGISTRATION_INSTALL_MODELS" in cmake
    assert "Resources/Icons/${MODULE_NAME}SampleData.png" in cmake
    assert (ROOT / "DeepRegistration" / "Resources" / "Icons" / "DeepRegistrationSampleData.png").is_file()

"""The tested ranges: every direct dependency declares a floor and an upper bound, the doctor prints the versions
that matter and warns outside the ranges, and the lock sits inside them."""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from doctor_helpers import REPO
from mmtrain import versions
from mmtrain.doctor.context import Context
from mmtrain.doctor.runtime_checks import check_versions


def setup_cfg_requirements():
    return versions.setup_cfg_requirements(extras=("test", "gpu"))


def test_every_direct_dependency_has_one_floor_and_one_upper_bound() -> None:
    for requirement in setup_cfg_requirements():
        operators = sorted(spec.operator for spec in requirement.specifier)
        assert operators == ["<", ">="], f"{requirement}: a tested floor (>=) and an upper bound (<)"


def test_the_lock_pins_every_direct_dependency_inside_its_range() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for requirement in setup_cfg_requirements():
        if requirement.name == "liger-kernel":  # GPU extra: CI installs no GPU packages
            assert requirement.name not in pins
            continue
        pin = pins[canonicalize_name(requirement.name)]  # pip freeze writes rouge_score, setup.cfg rouge-score
        assert requirement.specifier.contains(pin), (requirement, pin)


def test_declared_ranges_are_setup_cfgs() -> None:
    ranges = versions.declared_ranges()
    assert str(ranges["transformers"]) == str(SpecifierSet(">=4.57.6,<6"))
    assert not ranges["transformers"].contains("4.57.5") and not ranges["transformers"].contains("6.0.0")
    assert set(versions.WATCHED) <= set(ranges)


def ctx() -> Context:
    return Context(recipe=None, world_size=1, device_type="cpu", precision="fp32", out=REPO)  # type: ignore[arg-type]


def test_doctor_lists_the_versions_and_passes_inside_the_ranges() -> None:
    row = check_versions(ctx())
    assert row.status == "PASS", row.detail
    expected = ", ".join(f"{name} {metadata.version(name)}" for name in versions.WATCHED)
    assert row.detail == f"{expected}: all within the tested ranges"


def test_doctor_warns_outside_a_range_naming_library_version_and_range(monkeypatch) -> None:
    installed = metadata.version("transformers")
    narrowed = {**versions.declared_ranges(), "transformers": SpecifierSet(f">=4.57.6,<{installed}")}
    monkeypatch.setattr(versions, "declared_ranges", lambda: narrowed)
    row = check_versions(ctx())
    assert row.status == "WARN"
    assert row.detail.startswith(f"transformers {installed} is outside the tested range >=4.57.6,<{installed}; "
                                 "installed: ")
    assert "pip install -c constraints.txt -e ." in row.detail

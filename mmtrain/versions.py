"""The installed versions of the libraries training leans on, against the ranges mmtrain declares.

The declared ranges are the tested ones: each floor has run the suite (`.ci/oldest`), the lock (`constraints.txt`)
has run it, and `.ci/latest` runs the newest the ranges allow. A version outside them may work, but nobody here has
seen it work, so the doctor warns. `python -m mmtrain.versions` prints the table.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

WATCHED = ("torch", "transformers", "peft", "deepspeed", "webdataset")
"""The libraries whose version changes what training does (the doctor's table)."""

_SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"


def setup_cfg_requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    """install_requires (and the named extras) of the source checkout's setup.cfg; [] outside a checkout."""
    if not _SETUP_CFG.is_file():
        return []
    config = configparser.ConfigParser()
    config.read(_SETUP_CFG, encoding="utf-8")
    blocks = [config.get("options", "install_requires", fallback="")]
    blocks += [config.get("options.extras_require", extra) for extra in extras]
    return [Requirement(line.strip()) for block in blocks for line in block.splitlines() if line.strip()]


def _requirements() -> list[Requirement]:
    """A source checkout's setup.cfg (it may be newer than the installed metadata), else the installed
    distribution's."""
    from_checkout = setup_cfg_requirements()
    if from_checkout:
        return from_checkout
    try:
        return [Requirement(line) for line in metadata.requires("mmtrain") or [] if "extra ==" not in line]
    except metadata.PackageNotFoundError:
        return []


def declared_ranges() -> dict[str, SpecifierSet]:
    """Distribution name (normalised to lower case) → the version range mmtrain declares for it."""
    return {requirement.name.lower(): requirement.specifier for requirement in _requirements()}


@dataclass(frozen=True)
class LibraryVersion:
    name: str
    installed: str | None
    """None: not installed."""
    tested: SpecifierSet | None
    """None: mmtrain declares no range for it (or its requirements could not be read)."""

    @property
    def within(self) -> bool:
        return (self.installed is not None and self.tested is not None
                and self.tested.contains(self.installed, prereleases=True))

    @property
    def tested_text(self) -> str:
        """The range floor first (`>=4.57.6,<6`), or '-' without one."""
        if self.tested is None:
            return "-"
        return ",".join(sorted((str(spec) for spec in self.tested), key=lambda spec: not spec.startswith(">")))


def library_versions(names: tuple[str, ...] = WATCHED) -> list[LibraryVersion]:
    ranges = declared_ranges()
    out = []
    for name in names:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        out.append(LibraryVersion(name, installed, ranges.get(name.lower())))
    return out


def main() -> None:
    for library in library_versions():
        print(f"{library.name:<13} {library.installed or '-':<14} tested {library.tested_text:<18} "
              f"{'ok' if library.within else 'OUTSIDE THE TESTED RANGE'}")


if __name__ == "__main__":
    main()

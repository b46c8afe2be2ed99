"""Print `name==floor` for every direct dependency in setup.cfg (install_requires and the test extra): the
constraints `.ci/oldest` installs, so each floor in setup.cfg is a version that has run the suite."""

import configparser
import sys
from pathlib import Path

from packaging.requirements import Requirement

config = configparser.ConfigParser()
config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
lines = config["options"]["install_requires"].split("\n") + config["options.extras_require"]["test"].split("\n")
for line in filter(None, (raw.strip() for raw in lines)):
    requirement = Requirement(line)
    floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    if len(floors) != 1:
        sys.exit(f"setup.cfg: {line!r} needs exactly one '>=' floor")
    print(f"{requirement.name}=={floors[0]}")

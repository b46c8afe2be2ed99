"""Print `name==floor` for every direct dependency in setup.cfg (install_requires and the test extra): the
constraints `.ci/oldest` installs, so each floor in setup.cfg is a version that has run the suite."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmtrain.versions needs only `packaging`

from mmtrain.versions import setup_cfg_requirements  # noqa: E402

for requirement in setup_cfg_requirements(extras=("test",)):
    floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    if len(floors) != 1:
        sys.exit(f"setup.cfg: {requirement} needs exactly one '>=' floor")
    print(f"{requirement.name}=={floors[0]}")

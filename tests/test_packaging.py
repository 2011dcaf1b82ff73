"""setup.cfg: a wheel of punkdiff holds every package of the source tree (an editable install would hide a gap)."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package_of_the_tree():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    options = cfg["options"]
    listed = set(options["packages"].replace(",", " ").split())
    roots = {}  # package -> its folder, as package_dir maps them ("" is the root of top-level packages)
    for line in options["package_dir"].strip().splitlines():
        package, _, folder = (part.strip() for part in line.partition("="))
        roots[package] = REPO / folder
    found = set()
    for package, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            found.add(".".join(filter(None, (package, *init.parent.relative_to(folder).parts))))
    assert found == listed

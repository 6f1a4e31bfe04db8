"""constraints.txt pins every Python package, and the pins are what this environment runs.

pyproject.toml keeps ranges (what the package accepts); constraints.txt (made by `make lock`) is what
make install, .ci/run and the Dockerfile install, so a new release cannot change a fresh clone.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins(text: str) -> dict[str, str]:
    """Return {normalised name: version} of the ``name==version`` lines of a constraints file."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned with ==: {line!r}"
            found[canonicalize_name(name)] = version
    return found


def declared() -> list[Requirement]:
    """Return every requirement of pyproject.toml: dependencies, extras and the build system's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    texts = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for extra in project["project"]["optional-dependencies"].values():
        texts += extra
    return [Requirement(text) for text in texts if not text.startswith("vq-backup")]


def unmet(requirements: list[Requirement], pinned: dict[str, str]) -> list[str]:
    """Return one line per requirement that no pin satisfies."""
    return [
        f"{r.name}: {pinned.get(canonicalize_name(r.name), 'not pinned')} against {r.specifier}"
        for r in requirements
        if pinned.get(canonicalize_name(r.name)) not in r.specifier
    ]


def test_every_declared_requirement_is_pinned_inside_its_range():
    assert unmet(declared(), pins((ROOT / "constraints.txt").read_text())) == []


def test_a_pin_outside_its_range_or_missing_is_reported():
    pinned = pins("# made by make lock\nmoto==5.2.6\nboto3==1.40.0  # the SDK\n")
    requirements = [
        Requirement("moto[server]>=5.0,<5.2.6"),
        Requirement("boto3>=1.36"),
        Requirement("redis>=5"),
    ]
    assert unmet(requirements, pinned) == [
        "moto: 5.2.6 against <5.2.6,>=5.0",
        "redis: not pinned against >=5",
    ]


def test_this_environment_runs_the_pinned_versions():
    """Every pinned package that is installed here is at its pin (make install renews the venv
    when constraints.txt changes), and every installed one is pinned."""
    pinned = pins((ROOT / "constraints.txt").read_text())
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if canonicalize_name(d.metadata["Name"]) not in {"vq-backup", "wheel"}
    }
    assert {name: v for name, v in installed.items() if pinned.get(name) != v} == {}

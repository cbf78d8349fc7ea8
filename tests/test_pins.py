"""constraints.txt pins every package that `pip install -c constraints.txt -e ".[dev]"` installs."""
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"


def pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    return {canonicalize_name(name): version
            for name, _, version in (line.partition("==") for line in lines if line)}


def installed_closure(root: str, extras: tuple = ()) -> set[str]:
    """Names of the distributions that `root[extras]` pulls in, transitively (as installed)."""
    seen, todo = set(), [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                continue
            dep = canonicalize_name(req.name)
            try:
                distribution(dep)
            except PackageNotFoundError:   # a marker this platform does not meet
                continue
            if dep not in seen or req.extras:
                seen.add(dep)
                todo.append((dep, set(req.extras)))
    return seen


def test_every_installed_dependency_is_pinned_exactly():
    pinned = pins()
    assert all(v and "*" not in v for v in pinned.values())
    closure = installed_closure("fqtsim", ("dev",))
    assert {"torch", "numpy", "numba", "pandas", "pytest", "distributed"} <= closure
    missing = sorted(closure - set(pinned))
    assert not missing, f"add to constraints.txt: {missing}"
    for name in closure:
        assert distribution(name).version.split("+")[0] == pinned[name], name

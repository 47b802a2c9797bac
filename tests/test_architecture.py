"""The rooms of the tree (docs/architecture.md): no module imports one of a room above it."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Higher imports lower, never the reverse; rooms of one rank do not import each other.
RANKS = {
    "losses": 0,
    "data": 1,
    "models": 1,
    "training": 2,
    "train_script": 3,
    "worlds": 4,
    "benchmarks": 5,
    "evidence": 5,
    "scripts": 6,
}


def room_of(module: str) -> str | None:
    top = module.split(".")[0]
    if top.startswith("train_") and (ROOT / f"{top}.py").is_file():
        return "train_script"
    return top if top in RANKS else None


def project_imports(path: Path) -> set[str]:
    """The top-level names of the suite's modules that ``path`` imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if room_of(name)}


def source_files() -> list[Path]:
    files = sorted(ROOT.glob("train_*.py"))
    for room in RANKS:
        if (ROOT / room).is_dir():
            files += sorted((ROOT / room).rglob("*.py"))
    return files


def climbing_imports() -> list[str]:
    found = []
    for path in source_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = room_of(module)
        for imported in sorted(project_imports(path)):
            there = room_of(imported)
            if there != here and RANKS[there] >= RANKS[here]:
                found.append(f"{path.relative_to(ROOT)} imports {imported}")
    return found


def test_every_room_is_known():
    assert source_files(), "no source found"
    rooms = {room_of(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in source_files()}
    assert rooms == set(RANKS)


def test_no_module_imports_a_room_above_or_beside_it():
    assert climbing_imports() == []


def test_the_checker_sees_a_climbing_import(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reader.py").write_text("from training.loop import train\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "loop.py").write_text("import losses.distance\n")
    (tmp_path / "losses").mkdir()
    (tmp_path / "losses" / "distance.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert climbing_imports() == ["data/reader.py imports training.loop"]


def test_training_keeps_about_ten_modules_at_its_top():
    top = [p.name for p in (ROOT / "training").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 10, sorted(top)

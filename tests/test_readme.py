"""Every Python example in the README and in docs/ runs as written (```py blocks, which need real
model weights, are illustrations and are not run)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of ``path``, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


EXAMPLES = [
    pytest.param(code, id=f"{path.relative_to(ROOT).as_posix()}-{index + 1}")
    for path in DOCUMENTS
    for index, code in enumerate(python_blocks(path))
]


def test_the_docs_have_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs(code, request):
    name = request.node.callspec.id
    exec(compile(code, name, "exec"), {"__name__": "docs_example"})

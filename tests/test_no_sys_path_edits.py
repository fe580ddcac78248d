"""No file of the project edits sys.path: the package is installed (pip install -e .), so scripts, tests and tools
import it as users do, and an import that only works from one folder fails here instead of on a user's machine."""
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDITS = {"insert", "append", "extend", "remove", "clear"}


def sys_path_edits(source: str) -> list[int]:
    """Line numbers where `source` changes sys.path: a call of one of its editing methods, or an assignment to it
    (or to an item or slice of it)."""
    def is_sys_path(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EDITS \
                and is_sys_path(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t.value if isinstance(t, ast.Subscript) else t) for t in targets):
                lines.append(node.lineno)
    return sorted(lines)


def test_no_tracked_python_file_edits_sys_path():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(files) > 50, "git ls-files found no Python files"
    found = {name: lines for name in files if (lines := sys_path_edits((ROOT / name).read_text(encoding="utf-8")))}
    assert found == {}


def test_every_way_of_editing_sys_path_is_seen():
    source = ("import sys\nsys.path.insert(0, 'a')\nsys.path.append('b')\nsys.path[:0] = ['c']\n"
              "sys.path = ['d']\nsys.path += ['e']\nprint(sys.path)\nx = list(sys.path)\nother.path.append('f')\n")
    assert sys_path_edits(source) == [2, 3, 4, 5, 6]

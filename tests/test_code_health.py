"""Guards on the package's shape that review alone lets slip."""

import ast
from pathlib import Path

import asd_ray

LONGEST_CLASS = 200  # lines: a class past this does more than one job; split it


def test_no_class_in_the_package_is_longer_than_200_lines():
    root = Path(asd_ray.__file__).parent
    too_long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > LONGEST_CLASS:
                too_long.append(
                    f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
                )
    assert not too_long, f"classes over {LONGEST_CLASS} lines: {too_long}"

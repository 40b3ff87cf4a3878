"""Fail when an executed notebook holds a traceback, a warning or any text written to stderr.

Run by the Makefile on papermill's executed copies (``make notebooks``, ``make test-notebooks``); not a pytest
module. Usage: ``python tests/check_notebook_outputs.py book/_executed/notebooks/*.ipynb``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

# what must never reach a reader: warnings of any kind (deprecations first of all) and tracebacks
FORBIDDEN = re.compile(r"\w*Warning\b|Traceback \(most recent call last\)|\bwarn(ing)?:", re.IGNORECASE)


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return str(output.get("text", ""))
    data = output.get("data", {})
    return str(data.get("text/plain", ""))


def problems(path: Path) -> list[str]:
    """Every error output, stderr stream and warning-looking text of the notebook at ``path``."""
    nb = nbformat.read(path, as_version=4)
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            where = f"{path.name} cell {index}"
            if output.get("output_type") == "error":
                found.append(f"{where}: error {output.get('ename')}: {output.get('evalue')}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"{where}: stderr: {_text(output).strip()[:300]}")
            elif FORBIDDEN.search(_text(output)):
                found.append(f"{where}: {FORBIDDEN.search(_text(output)).group(0)!r} in output: "
                             f"{_text(output).strip()[:300]}")
    return found


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: check_notebook_outputs.py NOTEBOOK.ipynb ...", file=sys.stderr)
        return 2
    found = [p for path in paths for p in problems(Path(path))]
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"{len(found)} problem(s) in executed notebooks", file=sys.stderr)
        return 1
    print(f"{len(paths)} executed notebook(s): no errors, warnings or stderr output")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Check executed notebooks: no traceback, warning, stderr text, widget (headless runs show static
fallbacks), test marker or path of the build machine's repository, and (with ``--expected``) the
deterministic outputs equal the committed expectations.

Also: no code cell may appear in more than two of the notebooks given. Run by the Makefile on papermill's
executed copies (or on the sources: ``notebooks/*.ipynb``); not a pytest module. Usage:

    python tests/check_notebook_outputs.py book/_executed/notebooks/*.ipynb          # errors and warnings only
    python tests/check_notebook_outputs.py --expected tests/expected NB.ipynb ...   # + compare checked cells
    python tests/check_notebook_outputs.py --update tests/expected NB.ipynb ...     # rewrite the expectations

Checked cells carry the tag ``nbval-check-output`` (parameter tables, dataset summaries, the settings table, chapter
1's ``agrees`` column). Their text outputs, masked with the rules of ``nbval_sanitize.cfg``, are kept in
``<dir>/<notebook>.txt``, one section per cell id, so a changed count or #Params cell fails ``make test``.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

import nbformat

# what must never reach a reader: warnings of any kind (deprecations first of all) and tracebacks
FORBIDDEN = re.compile(r"\w*Warning\b|Traceback \(most recent call last\)|\bwarn(ing)?:", re.IGNORECASE)
# nbval compares the cells tagged so (a tag, not a comment: the marker stays out of the book's code)
CHECK_TAG = "nbval-check-output"
SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")
REPOSITORY = str(Path(__file__).resolve().parents[1])  # the build machine's path: never in a reader's notebook


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return str(output.get("text", ""))
    return str(output.get("data", {}).get("text/plain", ""))


def problems(path: Path) -> list[str]:
    """Every error output, stderr stream and warning-looking text of the notebook at ``path``."""
    nb = nbformat.read(path, as_version=4)
    found = []
    # papermill stamps each cell as it starts: when some never started, execution stopped in the last that did
    started = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    if 0 < len(started) < len(nb.cells):
        found.append(f"{path.name} cell {started[-1]} (id {nb.cells[started[-1]].get('id')}): execution stopped "
                     "here (an error, the cell time limit, or the kernel died)")
    if REPOSITORY in path.read_text(encoding="utf-8"):
        found.append(f"{path.name}: the build machine's path {REPOSITORY} appears in it (pass paths relative)")
    for index, cell in enumerate(nb.cells):
        where = f"{path.name} cell {index} (id {cell.get('id')})"
        if "NBVAL" in cell.source:  # markers are tags (nbval-check-output), out of the reader's sight
            found.append(f"{where}: an NBVAL marker comment in the source; tag the cell instead")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"{where}: error {output.get('ename')}: {output.get('evalue')}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"{where}: stderr: {_text(output).strip()[:300]}")
            elif "application/vnd.jupyter.widget-view+json" in output.get("data", {}):  # can deadlock nbclient
                found.append(f"{where}: an ipywidget in a headless run: {_text(output).strip()[:100]}")
            elif match := FORBIDDEN.search(_text(output)):
                found.append(f"{where}: {match.group(0)!r} in output: {_text(output).strip()[:300]}")
    return found


def checked_outputs(path: Path) -> str:
    """The masked text outputs of the notebook's checked cells, one ``## cell <id>`` section each."""
    rules = configparser.ConfigParser(interpolation=None)
    rules.read(SANITIZE)
    sections = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code" or CHECK_TAG not in cell.metadata.get("tags", []):
            continue
        text = "".join(_text(o) for o in cell.get("outputs", [])).rstrip() + "\n"
        for rule in rules.sections():
            text = re.sub(rules[rule]["regex"], rules[rule]["replace"], text)
        sections.append(f"## cell {cell.get('id')}\n{text}")
    return "\n".join(sections)


def compare(path: Path, expected_dir: Path, update: bool) -> list[str]:
    """Differences between the checked outputs of ``path`` and ``expected_dir/<name>.txt`` (or rewrite it)."""
    expected_file = expected_dir / f"{path.stem}.txt"
    actual = checked_outputs(path)
    if not actual and not expected_file.exists():  # a notebook without checked cells
        return []
    if update:
        expected_dir.mkdir(parents=True, exist_ok=True)
        expected_file.write_text(actual, encoding="utf-8")
        return []
    if not expected_file.is_file():
        return [f"{path.name}: no expectation {expected_file} (run `make update-expected` after checking it)"]
    if actual == expected_file.read_text(encoding="utf-8"):
        return []
    import difflib

    diff = difflib.unified_diff(expected_file.read_text(encoding="utf-8").splitlines(), actual.splitlines(),
                                str(expected_file), f"{path} (executed)", lineterm="", n=1)
    return [f"{path.name}: checked outputs differ from {expected_file}:\n" + "\n".join(diff)]


def shared_cells(paths: list[Path]) -> list[str]:
    """Code cells found in more than two of the notebooks: shared code belongs in mile_utils (papermill's injected
    parameters, the same everywhere by design, aside)."""
    where: dict[str, set[str]] = {}
    for path in paths:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and cell.source.strip() and \
                    "injected-parameters" not in cell.metadata.get("tags", []):
                where.setdefault(cell.source.strip(), set()).add(path.name)
    return [f"a code cell is in {len(names)} notebooks ({', '.join(sorted(names))}); put it in mile_utils: "
            f"{source[:100]!r}" for source, names in where.items() if len(names) > 2]


def main(args: list[str]) -> int:
    expected_dir, update = None, False
    if args[:1] in (["--expected"], ["--update"]) and len(args) > 1:
        expected_dir, update, args = Path(args[1]), args[0] == "--update", args[2:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    paths = [Path(a) for a in args]
    found = [p for path in paths for p in problems(path)] + shared_cells(paths)
    if expected_dir is not None:
        found += [p for path in paths for p in compare(path, expected_dir, update)]
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"{len(found)} problem(s) in executed notebooks", file=sys.stderr)
        return 1
    checked = f"; checked outputs {'written to' if update else 'equal'} {expected_dir}" if expected_dir else ""
    print(f"{len(paths)} executed notebook(s): no errors, warnings, stderr output or shared cells{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

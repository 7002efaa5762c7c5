"""``python -m benchmarks``: the benchmarks, one line each (nothing is imported or run)."""
import ast
import pkgutil
from pathlib import Path
from typing import List, Tuple

HERE = Path(__file__).resolve().parent


def runnable() -> List[Tuple[str, str]]:
    """(name, first docstring line) of each module here that runs as ``python -m``."""
    rows = []
    for module in pkgutil.iter_modules([str(HERE)]):
        source = (HERE / f"{module.name}.py").read_text(encoding="utf8")
        if module.name.startswith("_") or 'if __name__ == "__main__"' not in source:
            continue  # helpers (machine, paths)
        doc = ast.get_docstring(ast.parse(source)) or ""
        rows.append((module.name, doc.strip().splitlines()[0] if doc.strip() else ""))
    return sorted(rows)


def main() -> None:
    print("Benchmarks (from the repository root: python -m benchmarks.<name> --help):\n")
    rows = runnable()
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        print(f"  {name:<{width}}  {summary}")


if __name__ == "__main__":
    main()

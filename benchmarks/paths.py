"""Paths as benchmark results record them: relative to the repository, never a machine's own."""
import os
import site
import sysconfig
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
_ROOTS = (ROOT, Path(os.path.abspath(__file__)).parents[1])  # resolved and as reached
OUTSIDE = "<outside the repository>"


def relative(path: Union[str, Path]) -> str:
    """``path`` relative to the repository; outside it, only its last part is kept."""
    # a link inside the repository (corpus/, vectors/) counts as inside, wherever it points
    for candidate in (Path(os.path.abspath(path)), Path(path).resolve()):
        for root in _ROOTS:
            if candidate.is_relative_to(root):
                return str(candidate.relative_to(root))
    return f"{OUTSIDE}/{Path(path).name}"


def _prefixes() -> List[Tuple[str, str]]:
    """(machine prefix, what a result shows instead), longest first."""
    pairs = [(str(root), "") for root in _ROOTS]
    pairs += [(p, "<site-packages>") for p in site.getsitepackages() + [site.getusersitepackages()]]
    pairs += [(sysconfig.get_paths()[k], "<python>") for k in ("stdlib", "platstdlib")]
    unique = {prefix.rstrip("/") + "/": shown for prefix, shown in pairs if prefix}
    return sorted(((prefix, f"{shown}/" if shown else "") for prefix, shown in unique.items()),
                  key=lambda pair: -len(pair[0]))


def without_machine_paths(text: str) -> str:
    """Text (a cProfile table, a log) with this checkout's and this Python's folders taken out."""
    for prefix, shown in _prefixes():
        text = text.replace(prefix, shown)
    return text


def write_report(result: Dict[str, Any], output: Path, report: Optional[Path],
                 markdown: Callable[[Dict[str, Any]], str]) -> str:
    """Write a benchmark's result as JSON to ``output`` and, rendered, to ``report``; echo it."""
    import json

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    text = markdown(result)
    if report is not None:
        report.write_text(text)
    print(text)
    return text

"""What the benchmarks share: paths as results record them, the machine a run was on,
pipelines built for timing, and the timed passes over them.

Results record paths relative to the repository, never a machine's own. Every benchmark
runs offline: the shipped MiniLM is a local package, and a run must not fetch anything.
"""
import datetime
import json
import os
import platform
import resource
import site
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
_ROOTS = (ROOT, Path(os.path.abspath(__file__)).parents[1])  # resolved and as reached
OUTSIDE = "<outside the repository>"


# ----- paths -----------------------------------------------------------------------------
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
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    text = markdown(result)
    if report is not None:
        report.write_text(text)
    print(text)
    return text


# ----- the machine -----------------------------------------------------------------------
def machine() -> Dict[str, str]:
    """The date and the machine a benchmark ran on, for its report."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import spacy
    import torch

    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "spacy": spacy.__version__,
        "torch": torch.__version__,
    }


def machine_line(info: Dict[str, str]) -> str:
    return (
        f"{info['date']}, {info['cpu']}, {info['cores']} cores, OMP_NUM_THREADS="
        f"{info['omp_num_threads']}, Python {info['python']}, spaCy {info['spacy']}, "
        f"torch {info['torch']}"
    )


def load_average() -> List[float]:
    """The 1, 5 and 15 minute load averages (empty where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----- pipelines for timing --------------------------------------------------------------
#: Modules that register what the configs name, by package layout: this tree's first, then
#: the flat layout of the revisions before the package tree (whose modules registered their
#: names on import, where this tree's entry points would name modules they do not have).
REGISTERING = (("spacy_agban.layers.static_vectors", "spacy_agban.baseline"),
               ("spacy_agban.layers.transformer", "spacy_agban.transformer"))


def import_registrations() -> None:
    """Import the package and what registers the configs' names, in any revision's layout."""
    import importlib

    import spacy_agban  # noqa: F401  (the Doc extensions)

    for candidates in REGISTERING:
        for name in candidates:
            try:
                importlib.import_module(name)
                break
            except ModuleNotFoundError:
                continue


def ignore_installed_entry_points(package: str = "spacy_agban") -> None:
    """Let ``package``'s own modules register its names, not the installed entry points.

    catalogue prefers an entry point to a registered function, and the installed entry
    points name this tree's modules: a worker running an earlier revision would load them
    from this tree (the editable install finds a module its revision lacks) and mix two
    versions of the package. The earlier revisions register their names on import."""
    import catalogue

    own = catalogue.Registry._get_entry_points

    def without_package(registry: "catalogue.Registry") -> List[Any]:
        return [e for e in own(registry) if not e.value.startswith(package)]

    catalogue.Registry._get_entry_points = without_package  # type: ignore[method-assign]


def build_pipeline(config_path: Union[str, Path], root: Path = ROOT) -> "Language":
    """A pipeline from ``config_path`` initialized on the dev split, seed 0: the weights do
    not change the speed, and the same seed gives every code revision the same weights."""
    from spacy import util
    from spacy.training.initialize import init_nlp

    import_registrations()
    config = util.load_config(
        root / config_path,
        overrides={"corpora.train.path": str(root / "corpus" / "dev.spacy"),
                   "corpora.dev.path": str(root / "corpus" / "dev.spacy"),
                   "paths.vectors": str(root / "vectors" / "glove-6b-50d")},
        interpolate=False,
    )
    util.fix_random_seed(0)
    return init_nlp(config, use_gpu=-1)


def fresh_docs(nlp: "Language", path: Union[str, Path], limit: int = 0) -> List["Doc"]:
    """The first ``limit`` posts (0: all) of a DocBin as a pipeline's input: text, image,
    caption, no annotation. Only ``spacy_agban.extensions``, which every revision of the
    package has, so a worker running an earlier revision reads the same posts."""
    from spacy.tokens import DocBin

    from spacy_agban.extensions import INPUT_EXTENSIONS

    docs = []
    for reference in DocBin(store_user_data=True).from_disk(path).get_docs(nlp.vocab):
        if limit and len(docs) == limit:
            break
        doc = nlp.make_doc(reference.text)
        for name in INPUT_EXTENSIONS:
            doc._.set(name, reference._.get(name))
        docs.append(doc)
    return docs


def cold_caches(nlp: "Language") -> None:
    """Forget the per-form caches (the char BiLSTM's) of the agban pipe: the posts are the
    same in every repetition, and a warm cache would time a stream of posts already seen."""
    if "agban" not in nlp.pipe_names:
        return
    module = nlp.get_pipe("agban").model.get_ref("torch").shims[0]._model
    for sub in module.modules():
        if hasattr(sub, "clear_cache"):
            sub.clear_cache()


def time_batch1(nlp: "Language", docs: Sequence["Doc"]) -> Tuple[float, List["Doc"]]:
    """Seconds of ``nlp(doc)`` one post at a time, on copies of ``docs``, and the tagged copies."""
    copies = [d.copy() for d in docs]  # fresh docs: no entities from a previous repetition
    start = time.perf_counter()
    for doc in copies:
        nlp(doc)
    return time.perf_counter() - start, copies


def time_pipe(nlp: "Language", docs: Sequence["Doc"], batch_size: Optional[int] = None) -> Tuple[float, List["Doc"]]:
    """Seconds of ``nlp.pipe`` over copies of ``docs``, and the tagged copies."""
    copies = [d.copy() for d in docs]
    start = time.perf_counter()
    tagged = list(nlp.pipe(copies, batch_size=batch_size))
    return time.perf_counter() - start, tagged

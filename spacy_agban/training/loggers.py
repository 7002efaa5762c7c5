"""A training logger that also shows the adversarial loss.

spaCy's console logger shows one loss per trainable pipe; agban reports two (its CRF
loss under the pipe's name and the discriminator's loss under ``<name>_adv``). This
logger is ``spacy.ConsoleLogger.v3`` with extra loss columns, in the table and in the
JSONL output file.

The JSONL file is written here, not by spaCy's logger: spaCy's buffers its lines until the
training ends, so a run stopped by hand (the usual end of a long CPU training once dev has
stopped improving) left an empty log. Each line is flushed as it is written, with the same
keys as spaCy's plus ``seconds``, the wall time since the logger started, so a log also
says how long its run took.
"""
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import srsly
from spacy.training.loggers import console_logger_v3
from spacy.util import ensure_path, registry
from wasabi import Printer


class _Trainable:
    is_trainable = True


class _NlpWithExtraLosses:
    """What spaCy's console logger reads of ``nlp``, plus pseudo-pipes for extra losses."""

    def __init__(self, nlp: Any, extra_losses: Iterable[str]):
        self.config = nlp.config
        self.pipeline: List[Tuple[str, Any]] = list(nlp.pipeline)
        self.pipeline += [(name, _Trainable()) for name in extra_losses]


def log_line(info: Dict[str, Any], nlp: _NlpWithExtraLosses, seconds: float) -> Dict[str, Any]:
    """One JSONL line, as spaCy's console logger writes it (scores in percent but ``speed``),
    plus ``seconds``."""
    pipes = [name for name, proc in nlp.pipeline if getattr(proc, "is_trainable", False)]
    weights = nlp.config["training"]["score_weights"]
    scores = {}
    for column in (c for c, weight in weights.items() if weight is not None):
        score = float(info["other_scores"].get(column, 0.0))
        scores[str(column)] = score if column == "speed" else 100 * score
    return {"epoch": info["epoch"], "step": info["step"],
            "losses": {name: float(info["losses"][name]) for name in pipes},
            "scores": scores, "score": float(info["score"]), "seconds": round(seconds, 1)}


@registry.loggers("spacy_agban.ConsoleLogger.v1")
def console_logger_with_extra_losses(
    extra_losses: List[str] = ["agban_adv"],
    progress_bar: Optional[str] = None,
    console_output: bool = True,
    output_file: Optional[Union[str, Path]] = None,
):
    setup = console_logger_v3(progress_bar, console_output, None)
    path = ensure_path(output_file) if output_file else None
    # spaCy's rule: a log already there is never overwritten (decided when the config is read)
    existed = path is not None and path.exists()

    def setup_printer(nlp: Any, stdout: IO = sys.stdout, stderr: IO = sys.stderr
                      ) -> Tuple[Callable[[Optional[Dict[str, Any]]], None], Callable[[], None]]:
        if path is not None and console_output:  # before the table, where spaCy's logger says it
            printer = Printer(no_print=True)
            note = (printer.warn(f"Saving logs is disabled because {path} already exists.") if existed
                    else printer.info(f"Saving results to {path}"))
            print(note, file=stdout, flush=True)
        wrapped = _NlpWithExtraLosses(nlp, extra_losses)
        log_step, finalize = setup(wrapped, stdout, stderr)
        start, stream = time.monotonic(), None
        if path is not None and not existed:
            path.parent.mkdir(parents=True, exist_ok=True)
            stream = path.open("w", encoding="utf-8")

        def log_step_with_defaults(info: Optional[Dict[str, Any]]) -> None:
            if info is not None:
                for name in extra_losses:  # e.g. a text-only model has no adversarial loss
                    info["losses"].setdefault(name, 0.0)
                if stream is not None:
                    stream.write(srsly.json_dumps(log_line(info, wrapped, time.monotonic() - start)) + "\n")
                    stream.flush()
            log_step(info)

        def finalize_both() -> None:
            finalize()
            if stream is not None:
                stream.close()

        return log_step_with_defaults, finalize_both

    return setup_printer

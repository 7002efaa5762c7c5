"""A training logger that also shows the adversarial loss.

spaCy's console logger shows one loss per trainable pipe; agban reports two (its CRF
loss under the pipe's name and the discriminator's loss under ``<name>_adv``). This
logger is ``spacy.ConsoleLogger.v3`` with extra loss columns, in the table and in the
JSONL output file.
"""
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple, Union

from spacy.training.loggers import console_logger_v3
from spacy.util import registry


class _Trainable:
    is_trainable = True


class _NlpWithExtraLosses:
    """What spaCy's console logger reads of ``nlp``, plus pseudo-pipes for extra losses."""

    def __init__(self, nlp: Any, extra_losses: Iterable[str]):
        self.config = nlp.config
        self.pipeline: List[Tuple[str, Any]] = list(nlp.pipeline)
        self.pipeline += [(name, _Trainable()) for name in extra_losses]


@registry.loggers("spacy_agban.ConsoleLogger.v1")
def console_logger_with_extra_losses(
    extra_losses: List[str] = ["agban_adv"],
    progress_bar: Optional[str] = None,
    console_output: bool = True,
    output_file: Optional[Union[str, Path]] = None,
):
    setup = console_logger_v3(progress_bar, console_output, output_file)

    def setup_printer(nlp: Any, *args: Any, **kwargs: Any):
        log_step, finalize = setup(_NlpWithExtraLosses(nlp, extra_losses), *args, **kwargs)

        def log_step_with_defaults(info: Optional[dict]) -> None:
            if info is not None:
                for name in extra_losses:  # e.g. a text-only model has no adversarial loss
                    info["losses"].setdefault(name, 0.0)
            log_step(info)

        return log_step_with_defaults, finalize

    return setup_printer

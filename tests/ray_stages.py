"""Stage subclasses the Ray tests inject into ``run_ray`` (through ``Stages``): they
record where they ran, or slow down so that a test can act mid-run. Made by
:func:`placed` / :func:`slowed` at run time, so cloudpickle sends them by value
(class attributes included) and the workers need not import this module."""
import os
from pathlib import Path
from typing import Any, Type


def _record(folder: str, stage: str) -> None:
    import ray

    Path(folder, f"{stage}-{os.getpid()}").write_text(ray.get_runtime_context().get_node_id())


def placed(base: Type[Any], stage: str, folder: Path) -> Type[Any]:
    """``base`` that writes ``<stage>-<pid>`` holding its node id into ``folder``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        _record(str(folder), stage)

    return type(f"Placed{base.__name__}", (base,), {"__init__": __init__})


def slowed(base: Type[Any], seconds: float) -> Type[Any]:
    """``base`` that sleeps ``seconds`` before each batch."""

    def __call__(self, table: Any) -> Any:
        import time

        time.sleep(seconds)
        return base.__call__(self, table)

    return type(f"Slow{base.__name__}", (base,), {"__call__": __call__})

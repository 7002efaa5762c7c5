"""Timed versions of the Ray stages, injected by ``benchmarks.batch_speed`` through
``Stages`` (the product's stages carry no timing code). Each call appends its rows,
images and seconds to ``<folder>/<stage>-<pid>.jsonl``. Built at run time and sent
by value (``register``), so the workers need not import the benchmarks package."""
import json
import os
import time
from typing import Any, Callable, Type


def _record(folder: str, stage: str, rows: int, seconds: float, images: int = 0) -> None:
    line = json.dumps({"stage": stage, "rows": rows, "images": images, "seconds": seconds, "pid": os.getpid()})
    with open(os.path.join(folder, f"{stage}-{os.getpid()}.jsonl"), "a") as handle:
        handle.write(line + "\n")


def timed_function(fn: Callable[..., Any], stage: str, folder: str) -> Callable[..., Any]:
    def run(table: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(table, **kwargs)
        images = sum(k is not None for k in out["image_key"].to_pylist()) if "image_key" in out.column_names else 0
        _record(folder, stage, out.num_rows, time.perf_counter() - start, images)
        return out

    return run


def timed_actor(base: Type[Any], stage: str, folder: str) -> Type[Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        base.__init__(self, *args, **kwargs)
        _record(folder, f"{stage}_init", 0, time.perf_counter() - start)

    def __call__(self: Any, table: Any) -> Any:
        start = time.perf_counter()
        out = base.__call__(self, table)
        detected = sum(s == "detected" for s in out["image_status"].to_pylist()) if "image_status" in out.column_names else 0
        _record(folder, stage, table.num_rows, time.perf_counter() - start, detected)
        return out

    return type(f"Timed{base.__name__}", (base,), {"__init__": __init__, "__call__": __call__})


def register() -> None:
    import ray.cloudpickle

    from . import batch_stages

    ray.cloudpickle.register_pickle_by_value(batch_stages)

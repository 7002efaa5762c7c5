"""Detection speed (images/s, peak memory) of the two detectors, and the cost of a feature-store hit.

Images/second for Mask R-CNN and Faster R-CNN MobileNetV3 (random weights) at
two input sizes and two batch sizes, the peak memory of each, and the cost of a
feature-store hit, side by side. Each (model, size) runs in its own process so
that its peak RSS is its own. Writes a JSON file and prints a Markdown table.

    python -m benchmarks.detection_speed --images 8 --output bench_detection.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

from ._common import ROOT, peak_rss_mb

IMAGES = ROOT / "assets" / "twitter2015" / "images"
SIZES = {480: 800, 800: 1333}  # min_size: max_size (torchvision's ratio)


def image_paths(folder: Path, n: int) -> List[Path]:
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        sys.exit(f"no images in {folder}")
    return [paths[i % len(paths)] for i in range(n)]


def bench_one(model: str, min_size: int, batch_sizes: List[int], n: int, folder: Path) -> List[Dict[str, Any]]:
    """Run in a child process: time one (model, input size) at each batch size."""
    import torch

    from spacy_agban.detection.detector import make_fasterrcnn_mobilenet_detector, make_mask_rcnn_detector
    from spacy_agban.detection.images import ImageLoader

    torch.manual_seed(0)
    make = make_mask_rcnn_detector if model == "maskrcnn" else make_fasterrcnn_mobilenet_detector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = make(weights=None, min_size=min_size, max_size=SIZES[min_size], device="cpu",
                        score_threshold=0.05, top_k=3)
    loader = ImageLoader(image_root=folder, max_side=detector.max_size)
    images = [loader.load(p.name).image for p in image_paths(folder, n)]
    detector([images[0]])  # warm-up (allocator, kernels)
    rows = []
    for batch_size in batch_sizes:
        detector.batch_size = batch_size
        start = time.perf_counter()
        results = []
        for first in range(0, len(images), batch_size):
            results.extend(detector(images[first : first + batch_size]))
        seconds = time.perf_counter() - start
        rows.append({
            "model": model, "min_size": min_size, "max_size": SIZES[min_size], "batch_size": batch_size,
            "images": len(images), "seconds": seconds, "images_per_second": len(images) / seconds,
            "objects_per_image": sum(len(r) for r in results) / len(results),
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
        })
    return rows


def bench_store(folder: Path, n_repeat: int = 3) -> Dict[str, Any]:
    """Cost of a store hit: cold (hash the file) and warm (key memoized), per image."""
    import numpy
    import spacy

    from spacy_agban.detection.images import ImageLoader
    from spacy_agban.units.objects import ObjectUnits
    from spacy_agban.detection.store import Detections, FeatureStore
    names = [p.name for p in sorted(folder.glob("*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(Path(tmp) / "f.sqlite")
        loader = ImageLoader(image_root=folder)
        rng = numpy.random.default_rng(0)
        entries = [
            (loader.read(name).content_key(),
             Detections(rng.standard_normal((3, 1024)), ["a", "b", "c"], rng.random(3), rng.random((3, 4))))
            for name in names
        ]
        store.put_many(entries, "bench")
        nlp = spacy.blank("en")
        docs = []
        for name in names:
            doc = nlp.make_doc("x")
            doc._.image = name
            docs.append(doc)
        cold, warm = [], []
        for _ in range(n_repeat):
            units = ObjectUnits(store=store, image_root=folder, signature="bench")
            start = time.perf_counter()
            out = units(docs)
            cold.append((time.perf_counter() - start) / len(docs))
            start = time.perf_counter()
            units(docs)
            warm.append((time.perf_counter() - start) / len(docs))
            assert all(len(u) == 3 for u in out)
        return {"images": len(docs), "cold_ms_per_image": 1000 * min(cold), "warm_ms_per_image": 1000 * min(warm)}


def markdown(rows: List[Dict[str, Any]], store: Dict[str, Any]) -> str:
    lines = [
        "| model | input (min/max px) | batch | images/s | s/image | objects/image | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['min_size']}/{r['max_size']} | {r['batch_size']} | "
            f"{r['images_per_second']:.2f} | {1 / r['images_per_second']:.2f} | "
            f"{r['objects_per_image']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    fastest = max(r["images_per_second"] for r in rows)
    lines += [
        "",
        f"Feature-store hit ({store['images']} images): {store['cold_ms_per_image']:.2f} ms/image cold "
        f"(read + sha256 + SQLite), {store['warm_ms_per_image']:.3f} ms/image warm (key memoized); "
        f"the fastest detector run above is {1000 / fastest:.0f} ms/image, "
        f"{1000 / fastest / store['cold_ms_per_image']:.0f}x a cold hit.",
    ]
    return "\n".join(lines)


def write(path: Path, result: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="images per configuration")
    parser.add_argument("--folder", type=Path, default=IMAGES)
    parser.add_argument("--models", default="mobilenet,maskrcnn")
    parser.add_argument("--sizes", default="480,800")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--output", type=Path, default=Path("bench_detection.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.one:
        model, size = args.one.split(":")
        print(json.dumps(bench_one(model, int(size), batch_sizes, args.images, args.folder)))
        return
    rows: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for model in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, "-m", "benchmarks.detection_speed", "--one", f"{model}:{size}",
                   "--images", str(args.images), "--folder", str(args.folder.absolute()),
                   "--batch-sizes", args.batch_sizes]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{model} {size}px done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            write(args.output, {"detection": rows, "partial": True})  # survives an interrupted run
    store = bench_store(args.folder)
    result = {
        # Other work on the machine slows every row alike; the load average says how much.
        "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "python": sys.version.split()[0]},
        "weights": "random (weights=None); score_threshold 0.05, top_k 3, 1000 RPN proposals",
        "detection": rows, "store_hit": store, "total_seconds": time.perf_counter() - started,
    }
    write(args.output, result)
    print(markdown(rows, store))
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; JSON in {args.output})")


if __name__ == "__main__":
    main()

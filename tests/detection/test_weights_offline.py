"""A pipeline whose object units name pretrained detector weights that are not downloaded,
loaded without internet: one error that says how to get the weights, not urllib's chain."""
import urllib.error

import pytest
import spacy
import torch

from spacy_agban.detection.detector import WeightsUnavailableError


def test_detector_weights_offline_are_one_clear_error_at_load(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    units = {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(tmp_path / "objects.sqlite"),
             "detector": {"@misc": "spacy_agban.FasterRCNNMobileNetDetector.v1", "weights": "DEFAULT"}}
    nlp = spacy.blank("en")
    with pytest.raises(WeightsUnavailableError) as info:
        nlp.add_pipe("agban", config={"object_units": units})  # what spacy.load builds
    message = str(info.value)
    assert "cannot download the detector weights" in message and "name resolution" in message
    assert str(tmp_path / "hub" / "checkpoints" / "fasterrcnn_mobilenet_v3_large_fpn") in message
    assert "--weights" in message and "\n" not in message
    assert info.value.__suppress_context__  # no "During handling of the above exception" chain

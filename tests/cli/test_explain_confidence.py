"""explain reports each predicted entity's confidence."""
import spacy

from spacy_agban.cli.explain import explain_docs, load_pipeline, render_html


def test_explain_reports_confidences_even_of_a_pipeline_saved_without_them(caption_pipeline, tmp_path):
    _, path = caption_pipeline
    spacy.load(path, config={"components": {"agban": {"store_confidence": False}}}).to_disk(tmp_path / "off")
    nlp = load_pipeline(tmp_path / "off")
    post = nlp.make_doc("I love Paris")
    post._.image_caption = "the eiffel tower at night"
    (explained,) = explain_docs(nlp, [post], names=["post"], with_gold=False)
    confidence = explained.doc.ents[0]._.agban_confidence
    assert 0.5 < confidence <= 1.0
    assert f"<td>{confidence:.3f}</td>" in render_html(explained)

"""Distillation: a teacher's CRF tag marginals stored with the data, and the KL term."""
import numpy
import pytest
import spacy
import torch
from spacy.tokens import DocBin
from spacy.training import Example
from typer.testing import CliRunner

from conftest import CAPTION_POSTS, make_examples, make_nlp, train
from model_support import tiny_module
from spacy_agban.cli import app
from spacy_agban.model.agban import Batch
from spacy_agban.training.teacher import (
    TEACHER_KEY, average_targets, example_targets, pack_marginals, teacher_docs, unpack_marginals,
)


def _batch(n_tags: int = 5, teacher=None) -> Batch:
    torch.manual_seed(1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return Batch(
        word_ids=torch.tensor([[1, 2, 3], [4, 5, 0]]), static_vectors=torch.randn(2, 3, 4),
        char_ids=torch.randint(1, 50, (2, 3, 4)), char_lengths=torch.tensor([[4, 4, 4], [4, 4, 1]]),
        token_mask=mask, units={"caption": torch.randn(2, 2, 4)},
        unit_masks={"caption": torch.tensor([[True, True], [True, False]])},
        tags=torch.tensor([[1, 2, 0], [0, 3, 0]]), teacher=teacher,
    )


def test_distill_loss_is_the_kl_to_the_teacher_and_zero_at_the_model_itself():
    module = tiny_module(distill=2.0, adversarial=False).train()
    probe = _batch()
    with torch.no_grad():
        own = module.output.log_marginals(module.output.scores(module.features(probe).features),
                                          probe.token_mask).exp()
    at_itself = module(_batch(teacher=own))
    assert at_itself.distill_loss.item() == pytest.approx(0.0, abs=1e-4)
    sure = torch.zeros(2, 3, 5)
    sure[..., 0] = 1.0
    out = module(_batch(teacher=sure))
    log_model = module.output.log_marginals(module.output.scores(out.features), probe.token_mask)
    expected = -(log_model[..., 0][probe.token_mask]).sum()  # KL to a one-hot target
    assert out.distill_loss.item() == pytest.approx(2.0 * expected.item(), rel=1e-4)
    out.distill_loss.backward()
    assert module.output.emissions.weight.grad.abs().sum() > 0


def test_docs_without_targets_and_a_zero_weight_add_nothing():
    sure = torch.zeros(2, 3, 5)
    sure[0, :, 0] = 1.0  # the second doc has no targets
    module = tiny_module(distill=1.0, adversarial=False).train()
    only_first = module(_batch(teacher=sure)).distill_loss
    log_model = module.output.log_marginals(module.output.scores(module(_batch()).features), _batch().token_mask)
    assert only_first.item() == pytest.approx(-(log_model[0, :, 0]).sum().item(), rel=1e-4)
    off = tiny_module(distill=0.0, adversarial=False).train()(_batch(teacher=sure))
    assert off.distill_loss.item() == 0.0
    with pytest.raises(ValueError, match="distill"):
        tiny_module(distill=-1.0)


def test_packed_marginals_round_trip_by_tag_name():
    marginals = numpy.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype="float32")
    packed = pack_marginals(["O", "B-PER", "I-PER"], marginals)
    reordered = unpack_marginals(packed, ["B-PER", "I-PER", "O"])
    assert numpy.allclose(reordered, marginals[:, [1, 2, 0]], atol=1e-3)
    assert unpack_marginals(packed, ["O", "B-LOC", "I-LOC"]) is None
    with pytest.raises(ValueError):
        pack_marginals(["O", "B-PER"], marginals)


def _saved_teacher(folder, seed: int = 0, steps: int = 40):
    """A tiny agban pipeline trained on the caption posts and saved to ``folder``, and the
    posts' reference docs."""
    spacy.util.fix_random_seed(seed)
    teacher = make_nlp()
    train(teacher, make_examples(teacher, CAPTION_POSTS), steps=steps)
    teacher.to_disk(folder)
    return teacher, [eg.reference for eg in make_examples(teacher, CAPTION_POSTS)]


def test_teacher_targets_reach_the_student_through_the_data(tmp_path):
    teacher, references = _saved_teacher(tmp_path / "teacher")
    DocBin(docs=references, store_user_data=True).to_disk(tmp_path / "train.spacy")
    result = CliRunner().invoke(app, ["teacher-targets", str(tmp_path / "teacher"),
                                      str(tmp_path / "train.spacy"), str(tmp_path / "taught.spacy")])
    assert result.exit_code == 0, result.output
    assert f"{len(CAPTION_POSTS)} of {len(CAPTION_POSTS)} docs" in result.output
    student = make_nlp(distill=1.0)
    taught = list(DocBin().from_disk(tmp_path / "taught.spacy").get_docs(student.vocab))
    pipe = teacher.get_pipe("agban")
    expected = pipe.tag_marginals([_with_caption(teacher, d) for d in references])
    for doc, reference, marginals in zip(taught, references, expected):
        # the reference as it was (entities, caption), plus the teacher's marginals
        assert doc._.image_caption == reference._.image_caption
        assert [(e.start, e.end, e.label_) for e in doc.ents] == [(e.start, e.end, e.label_) for e in reference.ents]
        stored = unpack_marginals(doc.user_data[TEACHER_KEY], pipe.tags)
        assert numpy.allclose(stored, marginals, atol=2e-3)
        assert numpy.allclose(stored.sum(axis=1), 1.0, atol=1e-5)
    examples = [Example(_with_caption(student, d), d) for d in taught]
    student.initialize(lambda: examples)
    losses = {}
    student.update(examples, losses=losses)
    assert losses["agban_distill"] > 0
    text_only = make_nlp()  # distill 0: the targets are not read, no loss reported
    text_only.initialize(lambda: examples)
    losses = {}
    text_only.update(examples, losses=losses)
    assert "agban_distill" not in losses


def test_targets_for_other_tokens_are_not_used():
    nlp = make_nlp()
    reference = make_examples(nlp, CAPTION_POSTS[:1])[0].reference
    reference.user_data[TEACHER_KEY] = pack_marginals(["O", "B-PER"], numpy.full((3, 2), 0.5))
    same = Example(nlp.make_doc(reference.text), reference)
    assert example_targets(same, ["B-PER", "O"]).shape == (3, 2)
    assert example_targets(same, ["O", "B-PER", "I-PER"]) is None
    other = Example(nlp.make_doc("Kolo is here now"), reference)
    assert example_targets(other, ["O", "B-PER"]) is None


def test_an_ensemble_of_teachers_gives_the_mean_of_their_marginals(tmp_path):
    references = None
    expected = []
    for seed, steps in ((0, 40), (1, 10)):
        teacher, posts = _saved_teacher(tmp_path / f"teacher{seed}", seed, steps)
        references = references or posts
        pipe = teacher.get_pipe("agban")
        expected.append(pipe.tag_marginals([_with_caption(teacher, d) for d in references]))
    DocBin(docs=references, store_user_data=True).to_disk(tmp_path / "train.spacy")
    result = CliRunner().invoke(app, ["teacher-targets", str(tmp_path / "teacher0"), str(tmp_path / "train.spacy"),
                                      str(tmp_path / "taught.spacy"), "--also", str(tmp_path / "teacher1")])
    assert result.exit_code == 0, result.output
    assert f"{len(CAPTION_POSTS)} of {len(CAPTION_POSTS)} docs with the mean of 2 teachers'" in result.output
    taught = list(DocBin().from_disk(tmp_path / "taught.spacy").get_docs(make_nlp().vocab))
    for i, doc in enumerate(taught):
        stored = unpack_marginals(doc.user_data[TEACHER_KEY], pipe.tags)
        assert numpy.allclose(stored, (expected[0][i] + expected[1][i]) / 2, atol=2e-3)
        assert not numpy.allclose(expected[0][i], expected[1][i], atol=2e-2)  # two different teachers


def test_marginals_already_in_the_data_are_replaced_not_kept(tmp_path):
    teacher, references = _saved_teacher(tmp_path / "teacher", steps=10)
    empty = teacher.make_doc("")  # the teacher gives an empty post no marginals
    empty.user_data[TEACHER_KEY] = pack_marginals(["O"], numpy.ones((0, 1)))  # from an earlier tagging
    DocBin(docs=[*references, empty], store_user_data=True).to_disk(tmp_path / "train.spacy")
    result = CliRunner().invoke(app, ["teacher-targets", str(tmp_path / "teacher"),
                                      str(tmp_path / "train.spacy"), str(tmp_path / "taught.spacy")])
    assert result.exit_code == 0, result.output
    assert f"{len(CAPTION_POSTS)} of {len(CAPTION_POSTS) + 1} docs" in result.output
    taught = list(DocBin().from_disk(tmp_path / "taught.spacy").get_docs(teacher.vocab))
    assert TEACHER_KEY not in taught[-1].user_data


def test_teachers_of_other_tag_sets_or_tokens_give_no_mean():
    a = pack_marginals(["O", "B-PER"], numpy.array([[0.8, 0.2], [0.6, 0.4]]))
    b = pack_marginals(["B-PER", "O"], numpy.array([[0.4, 0.6], [0.0, 1.0]]))
    mean = unpack_marginals(average_targets([a, b]), ["O", "B-PER"])
    assert numpy.allclose(mean, [[0.7, 0.3], [0.8, 0.2]], atol=2e-3)  # mapped by tag name
    assert average_targets([a, pack_marginals(["O", "B-LOC"], numpy.full((2, 2), 0.5))]) is None
    assert average_targets([a, pack_marginals(["O", "B-PER"], numpy.full((3, 2), 0.5))]) is None


def test_teacher_docs_refuses_a_pipeline_without_agban():
    with pytest.raises(ValueError, match="no agban component"):
        list(teacher_docs(spacy.blank("en"), []))


def _with_caption(nlp, reference):
    doc = nlp.make_doc(reference.text)
    doc._.image_caption = reference._.image_caption
    return doc

import math

import pytest

from rank1_batch.model.judgement import FALLBACK_SCORE, Outcome, answered_label, consensus, judge, score_from_logprobs


@pytest.mark.parametrize("lt,lf", [(-0.1, -2.5), (-3.0, -0.05), (-1.0, -1.0), (-700.0, -0.0), (-0.0, -800.0)])
def test_score_matches_the_reference_formula(lt, lf):
    expected = math.exp(lt) / (math.exp(lt) + math.exp(lf)) if max(lt, lf) > -700 else None
    score = score_from_logprobs(lt, lf)
    if expected is not None:
        assert score == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= score <= 1.0


def test_extreme_logprobs_do_not_overflow():
    assert score_from_logprobs(0.0, -1e4) == 1.0
    assert score_from_logprobs(-1e4, 0.0) == 0.0


def test_answered_only_when_the_main_pass_stopped_on_a_label():
    stops = ("</think> true", "</think> false")
    assert answered_label("stop", "</think> true", stops)
    assert answered_label("stop", "</think> false", stops)
    assert not answered_label("length", None, stops)
    assert not answered_label("stop", None, stops)  # end of sequence without a label
    assert not answered_label("stop", 151643, stops)  # a stop token id


def test_judge_falls_back_when_logprobs_are_missing_or_unusable():
    assert judge(Outcome.FORCED, -0.2, None).outcome is Outcome.FALLBACK
    assert judge(Outcome.FORCED, float("-inf"), float("-inf")).score == FALLBACK_SCORE
    assert judge(Outcome.ANSWERED, float("nan"), -1.0).outcome is Outcome.FALLBACK
    assert judge(Outcome.FALLBACK, -0.1, -3.0).score == FALLBACK_SCORE


def test_judge_keeps_the_outcome_it_was_read_at():
    judgement = judge(Outcome.FORCED, -0.1, -3.0)
    assert judgement.outcome is Outcome.FORCED
    assert judgement.score == pytest.approx(score_from_logprobs(-0.1, -3.0))
    assert judge(Outcome.ANSWERED, float("-inf"), -0.1).score == 0.0


@pytest.mark.parametrize("score, threshold", [(0.73, 0.5), (0.31, 0.5), (0.5, 0.5), (0.1 + 0.2, 0.3)])
def test_one_sample_is_its_own_judgement(score, threshold):
    one = consensus([score], threshold)
    assert one.score == score  # exactly: a greedy run's scores are unchanged
    assert one.label == (score >= threshold) and one.agreement == 1.0 and one.chosen == 0


@pytest.mark.parametrize("scores, label, agreement, chosen", [
    ([0.9, 0.2, 0.7], True, 2 / 3, 0),
    ([0.2, 0.9, 0.1], False, 2 / 3, 0),
    ([0.9, 0.4, 0.45], False, 2 / 3, 1),  # the mean (0.583) is above the threshold, the majority below
    ([0.6, 0.7, 0.8], True, 1.0, 0),
    ([0.9, 0.2], True, 0.5, 0),  # a tie goes to the mean score (0.55)
    ([0.6, 0.1, 0.2, 0.9], False, 0.5, 1),  # a tie, the mean 0.45
])
def test_the_label_is_the_majoritys_and_the_agreement_its_share(scores, label, agreement, chosen):
    together = consensus(scores, 0.5)
    assert together.score == pytest.approx(sum(scores) / len(scores))
    assert (together.label, together.agreement, together.chosen) == (label, pytest.approx(agreement), chosen)


def test_the_mean_does_not_depend_on_the_samples_order():
    scores = [0.1, 0.2, 0.3]  # summed in order, 0.6000000000000001; in reverse, 0.6
    assert consensus(scores, 0.5).score == consensus(scores[::-1], 0.5).score == 0.6 / 3

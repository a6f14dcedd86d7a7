"""Runs with a score store, on the real engine, the session's Ray and moto's S3: three nights
over candidate lists that change a little, and a resume."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rank1_batch.run.pipeline import run
from rank1_batch.store.score_store import ScoreStore

from .conftest import candidate_lists, pair_keys, read_dir, tiny_job, write_shards

SORT = [("query_id", "ascending"), ("doc_id", "ascending")]


def night(root, name: str, pairs: pa.Table, store: str, **options) -> tuple[pa.Table, dict]:
    write_shards(pairs, root / name / "input", shards=2)
    job = tiny_job(input=[str(root / name / "input")], output=str(root / name / "output"), store=store,
                   batch_size=4, **options)
    manifest = run(job, show_progress=False)
    return read_dir(root / name / "output" / "scores").sort_by(SORT), manifest


def edited(pairs: pa.Table) -> pa.Table:
    """The next night's candidates: the same texts, two of them under new doc ids, and one passage edited."""
    rows = pairs.to_pylist()
    rows[0]["doc_id"], rows[1]["doc_id"] = "renamed-0", "renamed-1"
    rows[2]["text"] = rows[2]["text"] + " It was rebuilt last year."
    return pa.Table.from_pylist(rows, pairs.schema)


@pytest.fixture(scope="module")
def nights(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("nights")
    store = str(root / "store")
    pairs = candidate_lists(queries=2, per_query=5, seed=5)
    first = night(root, "first", pairs, store)
    second = night(root, "second", edited(pairs), store, threshold=0.3, grades=(0.2, 0.5, 0.8))
    third = night(root, "third", edited(pairs), store)
    return root, pairs, store, first, second, third


def by_text(scores: pa.Table, pairs: pa.Table) -> dict:
    """Each scored row by its pair's (query, passage)."""
    texts = {(row["query_id"], row["doc_id"]): (row["query"], row["text"]) for row in pairs.to_pylist()}
    return {texts[(row["query_id"], row["doc_id"])]: row for row in scores.to_pylist()}


def test_the_first_night_judges_every_pair_and_stores_it(nights):
    _, pairs, store, (scores, manifest), _, _ = nights
    assert manifest["store"] == {"url": store, "hits": 0, "misses": pairs.num_rows}
    assert not pc.any(scores["reused"]).as_py()


def test_the_next_night_judges_only_the_edited_passage(nights):
    _, pairs, store, (first, _), (second, manifest), _ = nights
    assert manifest["store"]["hits"] == pairs.num_rows - 1 and manifest["store"]["misses"] == 1
    assert manifest["counts"]["scored"] == pairs.num_rows and manifest["scored_this_run"] == 1
    assert ScoreStore.open(store).stats()["rows"] == pairs.num_rows + 1  # the edited passage, added
    before, after = by_text(first, pairs), by_text(second, edited(pairs))
    # The same texts under new doc ids are reused; the edited passage is judged again.
    assert {text for text, row in after.items() if not row["reused"]} == set(after) - set(before)
    for text, row in after.items():
        if row["reused"]:  # the stored judgement, bit for bit; the label is this night's threshold's
            for column in ("score", "logprob_true", "logprob_false", "outcome", "reasoning_tokens", "prompt_tokens"):
                assert row[column] == before[text][column], column
            assert row["label"] == (row["score"] >= 0.3)
        # the grade is this night's cut points', whether reused or judged
        assert row["grade"] == sum(row["score"] >= cut for cut in (0.2, 0.5, 0.8))


def test_a_night_whose_pairs_are_all_stored_starts_no_engine(nights):
    root, pairs, _, _, _, (scores, manifest) = nights
    assert manifest["engine"]["starts"] == 0 and manifest["scored_this_run"] == 0
    assert (manifest["store"]["hits"], manifest["store"]["misses"]) == (pairs.num_rows, 0)
    assert pc.all(scores["reused"]).as_py()
    assert pair_keys(read_dir(root / "third" / "output" / "traces")) == pair_keys(scores)


def test_another_reasoning_budget_reuses_nothing(nights, tmp_path):
    _, pairs, store, *_ = nights
    _, manifest = night(tmp_path, "budget", pairs, store, max_reasoning_tokens=48)
    assert manifest["store"]["hits"] == 0 and manifest["store"]["misses"] == pairs.num_rows


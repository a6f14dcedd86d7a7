"""`review export` and `review import`: Label Studio tasks of a hand-made output, in review order,
and the decisions of a real Label Studio export (tests/data/label-studio-export.json, made by
scripts/label_studio_round_trip.sh from a run of the bundled sample, whose scores/ and _job.json
are tests/data/review-run/)."""

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.config import JobConfig
from rank1_batch.ir.qrels import read_provenance
from rank1_batch.output.checkpoint import identity
from rank1_batch.review.decisions import review_agreement
from rank1_batch.review.scored import scale
from rank1_batch.schema import SCORES_SCHEMA, TRACES_SCHEMA, conform, grades

DATA = Path(__file__).parent / "data"
EXPORT = DATA / "label-studio-export.json"
REVIEWED_RUN = DATA / "review-run"
CUTS = (0.2, 0.5, 0.8)
# (query, doc, score, agreement of 3 samples, outcome). Distance to the nearest cut point: a 0.17,
# b 0.02, c 0.10, g 0.16, d 0.01, e 0.16, f 0.14; to the threshold 0.5: a 0.47, b 0.02, c 0.20,
# g 0.46, d 0.29, e 0.46, f 0.16. g and e score alike, so only their ids order them.
SCORED = [
    ("q1", "a", 0.97, 1.0, "answered"), ("q1", "b", 0.52, 1.0, "answered"), ("q1", "c", 0.30, 2 / 3, "answered"),
    ("q1", "g", 0.04, 1.0, "answered"), ("q2", "d", 0.79, 2 / 3, "answered"), ("q2", "e", 0.04, 1.0, "answered"),
    ("q2", "f", 0.66, 1.0, "forced"),
]
TEXTS = {"a": "The Esk runs through Old Vale.", "b": "Old Vale has a mill.", "c": "Bread rises.", "g": "Trains run.",
         "d": "Ann Hale built the mill.", "e": "The wheel is oak.", "f": "Mills grind corn."}
# Labels at 0.5: a, b, d, f true. Judged relevant from 2: c only. So a (0), f (0) and c (3) disagree;
# b (2) and e (1) agree; g and d are not judged.
QRELS = "q1 0 a 0\nq1 0 b 2\nq1 0 c 3\nq2 0 e 1\nq2 0 f 0\n"


def write_output(root: Path, graded: bool) -> Path:
    """A scored output of SCORED with its input, as a run of three samples writes it."""
    (root / "input").mkdir(parents=True)
    pq.write_table(pa.table({
        "query_id": [q for q, *_ in SCORED], "doc_id": [d for _, d, *_ in SCORED],
        "query": ["river of Old Vale" if q == "q1" else "who built the mill" for q, *_ in SCORED],
        "text": [TEXTS[d] for _, d, *_ in SCORED], "title": ["Esk" if d == "a" else None for _, d, *_ in SCORED],
        "instruction": ["briefly" if d == "b" else None for _, d, *_ in SCORED],
    }), root / "input" / "pairs-0.parquet")
    out = root / "out"
    job = JobConfig.from_options({"input": [str(root / "input")], "output": str(out), "model": "jhu-clsp/rank1-7b",
                                  "samples": 3, "temperature": 0.7, **({"grades": CUTS} if graded else {})})
    out.mkdir()
    (out / "_job.json").write_text(json.dumps(identity(job)))
    columns = list(zip(*SCORED))
    scores = conform(pa.table({
        "query_id": columns[0], "doc_id": columns[1], "score": columns[2], "label": [s >= 0.5 for s in columns[2]],
        "grade": grades(columns[2], CUTS if graded else None), "samples": pa.array([3] * len(SCORED), pa.int32()),
        "agreement": columns[3], "outcome": columns[4],
    }), SCORES_SCHEMA)
    traces = pa.table({"query_id": columns[0], "doc_id": columns[1],
                       "reasoning": [f"About {doc}." for doc in columns[1]]}).cast(TRACES_SCHEMA)
    for directory, table in (("scores", scores), ("traces", traces)):
        (out / directory).mkdir()
        pq.write_table(table, out / directory / "part-0.parquet")
    (root / "qrels.txt").write_text(QRELS)
    return out


@pytest.fixture
def graded_run(tmp_path):
    return write_output(tmp_path, graded=True)


def export(output: Path, *options: str) -> tuple[list[dict], str, str]:
    target = output.parent / "tasks.json"
    result = CliRunner().invoke(main, ["review", "export", str(output), "--to", str(target), *options])
    assert result.exit_code == 0, result.output
    return json.loads(target.read_text()), (output.parent / "tasks.label-config.xml").read_text(), result.output


def order(tasks: list[dict]) -> list[str]:
    return [task["data"]["doc_id"] for task in tasks]


def test_a_task_holds_the_pair_its_reasoning_and_the_models_grade_as_a_prediction(graded_run):
    tasks, config, _ = export(graded_run)
    by_doc = {task["data"]["doc_id"]: task for task in tasks}
    # d's 0.79 reaches 0.2 and 0.5, not 0.8: grade 2
    assert by_doc["d"] == {
        "data": {"query": "who built the mill", "title": "", "text": "Ann Hale built the mill.",
                 "reasoning": "About d.", "query_id": "q2", "doc_id": "d", "score": 0.79, "label": True, "grade": 2,
                 "agreement": 2 / 3, "outcome": "answered", "model": "jhu-clsp/rank1-7b",
                 "output": f"file://{graded_run}"},
        "predictions": [{"model_version": "jhu-clsp/rank1-7b", "score": 0.79, "result": [
            {"from_name": "relevance", "to_name": "passage", "type": "choices", "value": {"choices": ["2"]}}]}],
    }
    # a title is shown apart; an instruction goes after the query, as Rank1 reads it
    assert (by_doc["a"]["data"]["title"], by_doc["b"]["data"]["query"]) == ("Esk", "river of Old Vale briefly")
    assert [by_doc[doc]["predictions"][0]["result"][0]["value"]["choices"] for doc in "acg"] == [["3"], ["1"], ["0"]]

    view = ElementTree.fromstring(config)
    choices = view.find("Choices")
    assert [choice.get("value") for choice in choices] == ["0", "1", "2", "3"]
    texts = {text.get("name"): text.get("value") for text in view.iter("Text")}
    # the prediction's names are the configuration's, and each text it shows is a key of every task's data
    assert (choices.get("name"), choices.get("toName")) == ("relevance", "passage") and "passage" in texts
    assert set(texts.values()) == {"$query", "$title", "$text", "$reasoning"}
    assert all(value[1:] in task["data"] for value in texts.values() for task in tasks)


def test_a_binary_run_is_reviewed_as_relevant_or_not(tmp_path):
    tasks, config, _ = export(write_output(tmp_path, graded=False))
    assert [choice.get("value") for choice in ElementTree.fromstring(config).iter("Choice")] == ["not relevant",
                                                                                                "relevant"]
    said = {task["data"]["doc_id"]: task["predictions"][0]["result"][0]["value"]["choices"] for task in tasks}
    assert said == {"a": ["relevant"], "b": ["relevant"], "c": ["not relevant"], "g": ["not relevant"],
                    "d": ["relevant"], "e": ["not relevant"], "f": ["relevant"]}
    # lowest agreement first (c 0.20 before d 0.29 from the threshold), then nearest it
    assert order(tasks) == ["c", "d", "b", "f", "g", "e", "a"]


def test_uncertainty_order_lowest_agreement_then_nearest_a_cut_point(graded_run):
    tasks, _, said = export(graded_run)
    # agreement 2/3: d 0.01, c 0.10; then b 0.02, f 0.14, g and e 0.16 (by id: q1 before q2), a 0.17
    assert order(tasks) == ["d", "c", "b", "f", "g", "e", "a"]
    assert said.startswith(f"wrote 7 of 7 pairs to {graded_run.parent / 'tasks.json'}, lowest agreement first, "
                           "then nearest a grade's cut point (0.2, 0.5, 0.8)")
    tasks, _, said = export(graded_run, "--limit", "3", "--answered-only")
    assert order(tasks) == ["d", "c", "b"] and said.startswith("wrote 3 of 6 pairs") and "not answered 1" in said


def test_disagreement_order_puts_the_labels_the_qrels_contradict_first(graded_run):
    qrels = str(graded_run.parent / "qrels.txt")
    tasks, _, said = export(graded_run, "--order", "disagreement", "--qrels", qrels)
    # disagreeing c, f, a by uncertainty (c has agreement 2/3; f 0.14, a 0.17), then the rest as uncertainty
    assert order(tasks) == ["c", "f", "a", "d", "b", "g", "e"]
    assert f"the 3 whose label disagrees with {qrels} (relevance >= 2 is relevant) first, then lowest agreement" in said
    # at a cut of 1, e (judged 1, labelled false) disagrees too: it comes after f (0.14) and before a (0.17)
    tasks, _, _ = export(graded_run, "--order", "disagreement", "--qrels", qrels, "--relevance-cut", "1")
    assert order(tasks)[:4] == ["c", "f", "e", "a"]


def test_disagreement_order_needs_qrels(graded_run):
    result = CliRunner().invoke(main, ["review", "export", str(graded_run), "--to", str(graded_run / "x.json"),
                                       "--order", "disagreement"])
    assert result.exit_code == 2 and "--order disagreement and --qrels go together" in result.output


# The committed export (see label_studio_round_trip.py's plan), on the grades of the run:
#   task 1 (q006, q006-d009), model 1: user 1 chose 3                   -> 3, an override
#   task 2 (q001, q001-d009), model 1: user 1 chose 1, user 2 chose 3   -> a tie, left out
#   task 3 (q001, q001-d011), model 1: users 1 and 2 chose 3, user 3 1  -> 3, a majority
#   task 4 (q005, q005-d012), model 2: user 1 skipped                   -> no vote
#   task 5 (q005, q005-d018), model 2: user 2 skipped, user 1 chose 2   -> 2
#   task 6 (q002, q002-d014), model 2: user 2 chose 2                   -> 2
DECIDED = {("q001", "q001-d011"): 3, ("q002", "q002-d014"): 2, ("q005", "q005-d018"): 2, ("q006", "q006-d009"): 3}


def import_review(export_path: Path, target: Path, *options: str):
    return CliRunner().invoke(main, ["review", "import", str(export_path), "--to", str(target),
                                     "--run", str(REVIEWED_RUN), *options])


def read_qrels(path: Path) -> dict:
    return {(query, doc): int(relevance) for query, _, doc, relevance in map(str.split, path.read_text().splitlines())}


def test_import_writes_each_pairs_majority_and_leaves_ties_and_skips_out(tmp_path):
    target = tmp_path / "qrels.txt"
    result = import_review(EXPORT, target)
    assert result.exit_code == 0, result.output
    assert read_qrels(target) == DECIDED
    assert "6 tasks of 6 pairs" in result.output and "4 decisions written" in result.output
    assert "ties, left out: task 2 (q001, q001-d009): 1 for '1', 1 for '3'" in result.output
    assert "no vote (every annotation skipped): task 4 (q005, q005-d012)" in result.output
    # Reviewers 3 2 2 3 against the model's 1 2 2 1 (d011, d014, d018, d009): 2 of 4 alike; by chance
    # (2 * 2 for grade 2) / 16 = 1/4: kappa (1/2 - 1/4) / (3/4) = 1/3. Quadratic: observed 2 * 2^2 / 4 = 2;
    # by chance (row 2: 2*2*1 + row 3: 2*2*4 + 2*2*1) / 16 = 24/16: 1 - 2 / 1.5 = -1/3.
    assert "2 overridden" in result.output
    assert "Cohen's kappa 0.3333, quadratic-weighted -0.3333" in result.output
    assert "reviewers 3            0            2            0            0" in result.output

    provenance = {(row["query_id"], row["doc_id"]): row for row in read_provenance(str(target)).to_pylist()}
    scores = {(task["data"]["query_id"], task["data"]["doc_id"]): task["data"]["score"]
              for task in json.loads(EXPORT.read_text())}
    assert provenance.keys() == DECIDED.keys()
    assert {pair: row["annotators"] for pair, row in provenance.items()} == {
        ("q001", "q001-d011"): ["1", "2"], ("q002", "q002-d014"): ["2"], ("q005", "q005-d018"): ["1"],
        ("q006", "q006-d009"): ["1"]}
    for pair, row in provenance.items():
        assert (row["source"], row["model"], row["output"]) == ("human-review", "tiny", f"file://{REVIEWED_RUN}")
        assert row["relevance"] == DECIDED[pair] and row["model_score"] == scores[pair]
    assert {pair: row["model_relevance"] for pair, row in provenance.items()} == {
        ("q001", "q001-d011"): 1, ("q002", "q002-d014"): 2, ("q005", "q005-d018"): 2, ("q006", "q006-d009"): 1}


def test_import_finds_the_run_its_tasks_name(tmp_path):
    tasks = json.loads(EXPORT.read_text())
    for task in tasks:
        task["data"]["output"] = f"file://{REVIEWED_RUN}"
    moved = tmp_path / "export.json"
    moved.write_text(json.dumps(tasks))
    result = CliRunner().invoke(main, ["review", "import", str(moved), "--to", str(tmp_path / "qrels.txt")])
    assert result.exit_code == 0, result.output
    assert read_qrels(tmp_path / "qrels.txt") == DECIDED


def test_merge_into_a_runs_qrels_the_reviewers_winning(tmp_path):
    run_qrels, target = tmp_path / "run-qrels.txt", tmp_path / "merged.txt"
    made = CliRunner().invoke(main, ["qrels", str(REVIEWED_RUN), "--to", str(run_qrels)])
    assert made.exit_code == 0, made.output
    model = read_qrels(run_qrels)
    result = import_review(EXPORT, target, "--merge", str(run_qrels))
    assert result.exit_code == 0, result.output
    # every pair of the run, the model's grade but where a reviewer decided (the tie keeps the model's 1)
    assert read_qrels(target) == {**model, **DECIDED} and len(model) == 160
    assert model[("q006", "q006-d009")] == 1 and model[("q001", "q001-d009")] == 1
    provenance = read_provenance(str(target))
    sources = dict(zip(zip(provenance["query_id"].to_pylist(), provenance["doc_id"].to_pylist()),
                       provenance["source"].to_pylist()))
    assert {pair for pair, source in sources.items() if source == "human-review"} == DECIDED.keys()
    assert {source for pair, source in sources.items() if pair not in DECIDED} == {"model"}
    # the model's rows keep the provenance the run's qrels had
    assert provenance.filter(pc.equal(provenance["source"], "model"))["template"].null_count == 0


def test_merge_into_plain_qrels_keeps_their_other_judgments_as_human(tmp_path):
    human, target = tmp_path / "human.txt", tmp_path / "merged.txt"
    human.write_text("q001 0 q001-d009 0\nq006 0 q006-d009 0\nq009 0 q009-d001 1\n")
    result = import_review(EXPORT, target, "--merge", str(human))
    assert result.exit_code == 0, result.output
    assert read_qrels(target) == {**DECIDED, ("q001", "q001-d009"): 0, ("q009", "q009-d001"): 1}
    provenance = {(row["query_id"], row["doc_id"]): row for row in read_provenance(str(target)).to_pylist()}
    human_row = provenance["q009", "q009-d001"]
    assert (human_row["source"], human_row["output"]) == ("human", str(human))
    assert provenance["q006", "q006-d009"]["source"] == "human-review"


def edited_export(tmp_path: Path, edit) -> Path:
    tasks = json.loads(EXPORT.read_text())
    edit(tasks)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def json_not_an_export(tmp_path: Path) -> Path:
    return REVIEWED_RUN / "_job.json"


def not_json(tmp_path: Path) -> Path:
    path = tmp_path / "qrels.txt"
    path.write_text("q1 0 a 1\n")
    return path


def pair_not_in_the_run(tmp_path: Path) -> Path:
    return edited_export(tmp_path, lambda tasks: tasks[5]["data"].update(doc_id="q002-d999"))


def choice_outside_the_scale(tmp_path: Path) -> Path:
    return edited_export(tmp_path, lambda tasks: tasks[5]["annotations"][0]["result"][0]["value"].update(
        choices=["relevant"]))


@pytest.mark.parametrize("make, message", [
    (json_not_an_export, "not a Label Studio JSON export (a list of tasks, each with its id, data and annotations)"),
    (not_json, "not JSON (Expecting value: line 1 column 1 (char 0)), so not a Label Studio JSON export"),
    (pair_not_in_the_run, f"task 6 (q002, q002-d999): not a pair that file://{REVIEWED_RUN} scored"),
    (choice_outside_the_scale,
     "task 6 (q002, q002-d014), annotation 10: 'relevant' is not one choice of the run's scale (0, 1, 2, 3)"),
])
def test_bad_input_is_refused_naming_the_task_and_nothing_is_written(tmp_path, make, message):
    source = make(tmp_path)
    target = tmp_path / "out" / "qrels.txt"
    (tmp_path / "out").mkdir()
    result = import_review(source, target)
    assert result.exit_code == 1 and f"{source}" in result.output and message in result.output, result.output
    assert list((tmp_path / "out").iterdir()) == []


def test_reviewers_against_the_model_by_hand():
    reviewed = pa.table({"relevance": pa.array([3, 2, 2, 3], pa.int64()),
                         "model_relevance": pa.array([1, 2, 2, 3], pa.int64())})
    result = review_agreement(reviewed, scale(graded=True))
    # Observed 3/4 alike. Reviewers: 2 twos, 2 threes; model: 1 one, 2 twos, 1 three. By chance
    # (2*2 + 2*1) / 16 = 3/8: kappa (3/4 - 3/8) / (5/8) = 0.6. Quadratic: observed (3 - 1)^2 / 4 = 1; by chance
    # (row 2: 2*1*1 + 2*1*1; row 3: 2*1*4 + 2*2*1) / 16 = 16/16 = 1: 1 - 1/1 = 0.
    assert (result.pairs, result.overridden) == (4, 1)
    assert result.kappa == pytest.approx(0.6) and result.quadratic_kappa == pytest.approx(0.0)
    assert result.confusion == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 1, 0, 1]]
    binary = review_agreement(pa.table({"relevance": [1, 1, 0, 0], "model_relevance": [1, 0, 0, 0]}), scale(False))
    # Observed 3/4; by chance (2*1 + 2*3) / 16 = 1/2: kappa (3/4 - 1/2) / (1/2) = 0.5; no quadratic for two choices
    assert binary.kappa == pytest.approx(0.5) and binary.quadratic_kappa is None
    assert binary.choices == ["not relevant", "relevant"] and binary.confusion == [[2, 0], [1, 1]]


def test_a_run_without_traces_gives_tasks_without_reasoning(graded_run):
    for path in (graded_run / "traces").iterdir():
        path.unlink()
    tasks, _, _ = export(graded_run, "--limit", "2")
    assert [task["data"]["reasoning"] for task in tasks] == ["", ""]

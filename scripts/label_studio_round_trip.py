"""Drive a running Label Studio through a review's round trip, over its REST API (standard library
only): create a project from the labeling configuration that `rank1-batch review export` wrote,
import the exported tasks, annotate some as reviewers would (an override of the model, a tie
between two annotators, a majority of three, a skipped task, and a skip beside a vote), export
the project as JSON, run `rank1-batch review import` on the export, and check that the qrels hold
exactly the decisions made. Exits non-zero otherwise. Started by label_studio_round_trip.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path

log = logging.getLogger("label_studio_round_trip")
# Label Studio 1.23.2 answers /health about 50 s after it starts on a 2-core machine.
START_TIMEOUT = 300


class LabelStudio:
    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body=None):
        request = urllib.request.Request(self.url + path, method=method, headers=self.headers,
                                         data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise SystemExit(f"{method} {path}: HTTP {error.code}: {error.read()[:1000]!r}") from None

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"Label Studio at {self.url} did not answer /health in {START_TIMEOUT} s")
                time.sleep(2)


def choices_of(config: str) -> list[str]:
    return [choice.get("value") for choice in ElementTree.fromstring(config).iter("Choice")]


def relevance(choice: str) -> int:
    """What `review import` writes for a choice: a grade is itself; relevant 1, not relevant 0."""
    return int(choice) if choice.isdigit() else int(choice == "relevant")


def vote(choice: str | None, user: int) -> dict:
    """An annotation: a choice, or a skip (cancelled, no result)."""
    result = [] if choice is None else [{"from_name": "relevance", "to_name": "passage", "type": "choices",
                                         "value": {"choices": [choice]}}]
    return {"result": result, "completed_by": user, "was_cancelled": choice is None}


def plan(tasks: list[dict], choices: list[str], users: list[int]) -> tuple[list[list[dict]], dict]:
    """Annotations for the first six tasks, and the qrels they must give: {(query_id, doc_id): relevance}."""
    first, second, third = users
    said = [task["predictions"][0]["result"][0]["value"]["choices"][0] for task in tasks[:6]]
    other = [choices[-1] if model != choices[-1] else choices[0] for model in said]
    annotations = [
        [vote(other[0], first)],  # overrides the model
        [vote(said[1], first), vote(other[1], second)],  # a tie: no decision
        [vote(other[2], first), vote(other[2], second), vote(said[2], third)],  # a majority of two to one
        [vote(None, first)],  # skipped: no decision
        [vote(None, second), vote(said[4], first)],  # a skip is no vote: the one vote decides
        [vote(said[5], second)],  # agrees with the model
    ]
    decided = {0: other[0], 2: other[2], 4: said[4], 5: said[5]}
    expected = {(tasks[n]["data"]["query_id"], tasks[n]["data"]["doc_id"]): relevance(choice)
                for n, choice in decided.items()}
    return annotations, expected


def round_trip(studio: LabelStudio, tasks: list[dict], config: str, work: Path, rank1_batch: str) -> dict:
    """Everything against the server; returns the export."""
    project = studio.call("POST", "/api/projects", {"title": "rank1-batch review", "label_config": config})
    imported = studio.call("POST", f"/api/projects/{project['id']}/import", tasks)
    if (imported["task_count"], imported["prediction_count"]) != (len(tasks), len(tasks)):
        raise SystemExit(f"imported {imported}, not {len(tasks)} tasks with a prediction each")
    listed = studio.call("GET", f"/api/tasks?project={project['id']}&page_size={len(tasks)}")["tasks"]
    ids = {(task["data"]["query_id"], task["data"]["doc_id"]): task["id"] for task in listed}
    users = [studio.call("GET", "/api/current-user/whoami")["id"]]
    for name in ("second", "third"):  # named by project, so that a server can take several round trips
        name = f"{name}-{project['id']}"
        users.append(studio.call("POST", "/api/users/", {"username": name, "email": f"{name}@example.com"})["id"])
    annotations, expected = plan(tasks, choices_of(config), users)
    for task, made in zip(tasks, annotations):
        for annotation in made:
            studio.call("POST", f"/api/tasks/{ids[task['data']['query_id'], task['data']['doc_id']]}/annotations",
                        annotation)
    log.info("project %s: %d tasks imported, %d annotated", project["id"], len(tasks), len(annotations))
    export = studio.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON")
    (work / "export.json").write_text(json.dumps(export, indent=1))
    if len(export) != len(annotations):
        raise SystemExit(f"the export holds {len(export)} tasks, not the {len(annotations)} annotated")
    check_import(work, rank1_batch, expected)
    return export


def check_import(work: Path, rank1_batch: str, expected: dict) -> None:
    qrels = work / "qrels.txt"
    done = subprocess.run([rank1_batch, "review", "import", str(work / "export.json"), "--to", str(qrels)],
                          capture_output=True, text=True)
    log.info("rank1-batch review import:\n%s", done.stdout.rstrip())
    if done.returncode:
        raise SystemExit(f"review import failed: {done.stderr}")
    written = {(query_id, doc_id): int(rel) for query_id, _, doc_id, rel in
               (line.split() for line in qrels.read_text().splitlines())}
    if written != expected:
        raise SystemExit(f"the qrels hold {written}, not the decisions made {expected}")
    if not (work / "qrels.txt.provenance.parquet").exists():
        raise SystemExit("no provenance beside the qrels")
    log.info("round trip checked: the qrels hold exactly the %d decisions made", len(expected))


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="The Label Studio server.")
    parser.add_argument("--token", required=True, help="Its user's legacy API token.")
    parser.add_argument("--tasks", required=True, type=Path, help="The tasks `review export` wrote.")
    parser.add_argument("--work", required=True, type=Path, help="Where the export and the qrels go.")
    parser.add_argument("--rank1-batch", default="rank1-batch", help="The rank1-batch command.")
    parser.add_argument("--save-export", type=Path, help="Also copy Label Studio's export here.")
    args = parser.parse_args()
    tasks = json.loads(args.tasks.read_text())
    config = Path(str(args.tasks).removesuffix(".json") + ".label-config.xml").read_text()
    if len(tasks) < 6:
        raise SystemExit(f"{args.tasks}: {len(tasks)} tasks; the round trip annotates six")
    studio = LabelStudio(args.url, args.token)
    studio.wait()
    export = round_trip(studio, tasks, config, args.work, args.rank1_batch)
    if args.save_export:
        args.save_export.write_text(json.dumps(export, indent=1) + "\n")
        log.info("export saved to %s", args.save_export)


if __name__ == "__main__":
    sys.exit(main())

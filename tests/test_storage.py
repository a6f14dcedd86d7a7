"""An output's listing of its part files, and removing a file or a directory: on local disk, on
S3 (moto's server), where a listing is read a page at a time, and on any other fsspec store (its
in-memory one)."""

from __future__ import annotations

import boto3
import pytest
from rank1_batch.output import storage

from rank1_batch.config import RunConfig
from rank1_batch.output.storage import Output


@pytest.fixture(params=["local", "s3", "memory"])
def output(request, tmp_path):
    if request.param == "local":
        return Output(str(tmp_path / "out"), RunConfig())
    # the test's own name, without the brackets a glob would read as a pattern
    name = request.node.name.replace("_", "-").replace("[", "-").rstrip("]")[:40].lower()
    if request.param == "memory":
        return Output(f"memory://{name}/out", RunConfig())
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"listing-{name}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return Output(f"s3://{bucket}/out", RunConfig(s3_endpoint_url=endpoint))


def test_a_listing_has_each_part_file_with_its_size_over_several_pages(output, monkeypatch):
    monkeypatch.setattr(storage, "LISTING_PAGE_KEYS", 2)
    sizes = {f"part-{number}.parquet": 10 + number for number in (4, 0, 3, 1, 2)}
    for name, size in sizes.items():
        output.write_bytes(f"scores/{name}", b"x" * size)
    output.write_bytes("scores/.part-5.parquet", b"being written")  # a staging name
    output.write_bytes("scores/_done", b"a marker")
    output.write_bytes("scoresheet/part-6.parquet", b"another directory, sharing the name's start")

    listed = output.listing("scores")

    assert list(listed.values()) == [10, 11, 12, 13, 14]  # in name order
    assert listed == {output.path("scores", name): size for name, size in sizes.items()}
    assert output.listing("missing") == {}


def test_removing_a_file_or_a_directory_removes_it_and_a_missing_one_is_nothing_to_do(output):
    for name in ("part-0.parquet", "part-1.parquet"):
        output.write_bytes(f"ranked/{name}", b"x")
    for name in ("ranked.txt", "_manifest.json"):  # the first shares the directory's name's start
        output.write_bytes(name, b"x")

    for name in ("ranked", "_manifest.json"):
        output.remove(name)
        output.remove(name)  # gone already

    assert output.listing("ranked") == {}
    assert output.entries() == ["ranked.txt"]

"""SourceOptions carries the service's S3 bucket allowlist to every check and fetch."""

from __future__ import annotations

from pathlib import Path

import pytest

from gralora.errors import DatasetRefused
from gralora.pipeline import SourceOptions
from gralora.sources import check_dataset_uri, fetch_dataset


def test_an_empty_bucket_allowlist_refuses_every_s3_dataset(tmp_path: Path) -> None:
    options = SourceOptions(cache_dir=tmp_path, s3_buckets=[])
    with pytest.raises(DatasetRefused):
        check_dataset_uri("s3://data/train.jsonl", options)
    with pytest.raises(DatasetRefused):
        fetch_dataset("s3://data/train.jsonl", options)


def test_listed_buckets_pass_the_static_check(tmp_path: Path) -> None:
    options = SourceOptions(cache_dir=tmp_path, s3_buckets=["data"])
    check_dataset_uri("s3://data/train.jsonl", options)
    with pytest.raises(DatasetRefused):
        check_dataset_uri("s3://other/train.jsonl", options)

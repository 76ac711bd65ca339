"""One registry of sources: every job source has exactly one ingress, and everything that lists
sources (the webhooks' filter, the CLI, the OpenAPI schema) takes them from `JobSource`."""

from __future__ import annotations

import pytest

from bridge.api.openapi import document
from bridge.cli import build_parser
from bridge.ingress.registry import INGRESSES
from bridge.jobs.model import JobSource
from bridge.webhooks.model import SOURCES


def test_every_source_has_exactly_one_ingress():
    assert sorted(k.source.value for k in INGRESSES) == sorted(s.value for s in JobSource)


def test_source_lists_come_from_the_registry():
    values = [s.value for s in JobSource]
    assert list(SOURCES) == values
    assert document()["components"]["schemas"]["Job"]["properties"]["source"]["enum"] == values
    parser = build_parser()
    for value in values:
        assert parser.parse_args(["jobs", "list", "--source", value]).source == value
    with pytest.raises(SystemExit):
        parser.parse_args(["jobs", "list", "--source", "fax"])


"""--rename-columns: PascalCase sources land in snake_case (or mapped) target columns."""

from __future__ import annotations

import pytest

import etl
from etl.naming import rename_map, snake_case
from tests.conftest import execute, scalar


@pytest.mark.parametrize("name,expected", [
    ("InvoiceLineId", "invoice_line_id"), ("ArtistId", "artist_id"), ("HTTPStatus", "http_status"),
    ("already_snake", "already_snake"), ("Total2Pay", "total2_pay"), ("Unit Price", "unit_price"),
])
def test_snake_case(name: str, expected: str) -> None:
    assert snake_case(name) == expected


def test_collisions_and_unknown_names_are_refused() -> None:
    with pytest.raises(etl.UsageError, match="same name"):
        rename_map("lower", ["Id", "ID"])
    with pytest.raises(etl.UsageError, match="Nope"):
        rename_map("Nope=x", ["Id"])


def _source(src: str) -> None:
    execute(src, """
        CREATE TABLE "InvoiceLine" ("InvoiceLineId" int PRIMARY KEY, "UnitPrice" numeric(10,2),
                                    "TrackName" text);
        INSERT INTO "InvoiceLine" SELECT g, g * 0.99, 'Track \\ ' || g FROM generate_series(1, 3000) g;
    """)


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_snake_case_target_created_and_resumable(src: str, dst: str, mode: str) -> None:
    _source(src)
    kw = dict(source=src, target=dst, table="InvoiceLine",
              to_table="invoice_line", rename_columns="snake_case", chunk_size=700, mode=mode)
    first = etl.copy(**kw)
    assert first.status is etl.Status.COMPLETED, first.message
    cols = scalar(dst, "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute "
                       "WHERE attrelid = 'invoice_line'::regclass AND attnum > 0")
    assert cols == ["invoice_line_id", "unit_price", "track_name"]
    assert scalar(dst, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE "
                       "conrelid = 'invoice_line'::regclass AND contype = 'p'") == \
        "PRIMARY KEY (invoice_line_id)"
    got = scalar(dst, "SELECT md5(string_agg(t::text, ',' ORDER BY 1)) FROM invoice_line t")
    want = scalar(src, 'SELECT md5(string_agg(t::text, \',\' ORDER BY 1)) FROM "InvoiceLine" t')
    assert got == want
    if mode == "upsert":
        again = etl.copy(**kw, restart=True)
        assert again.to_dict()["metadata"]["outcomes"]["unchanged"] == 3000


def test_explicit_mapping(src: str, dst: str) -> None:
    _source(src)
    etl.copy(source=src, target=dst, table="InvoiceLine", to_table="lines",
             rename_columns={"UnitPrice": "price"})
    assert scalar(dst, 'SELECT count(*) FROM lines WHERE price IS NOT NULL AND "TrackName" '
                       "IS NOT NULL") == 3000

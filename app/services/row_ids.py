"""Ids and version numbers that name database rows, bounded as the columns are.

Postgres `integer` columns hold up to 2**31 - 1; a larger number sent to the database is an error
of the statement, not "no such row". Checking the bound where a request arrives turns it into a
422 that names the field, and documents the range in /openapi.json.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_ROW_ID = 2**31 - 1

RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]
PolicyVersion = Annotated[int, Field(ge=0, le=MAX_ROW_ID)]

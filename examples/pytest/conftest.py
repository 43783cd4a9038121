"""Per-test PostgreSQL databases from isoenv's pool, for pytest with psycopg.

Run the suite with the pool kept for it:

    cargo xtask run --isolated --pool --engine postgres -- pytest

`run --pool` exports the server (ISOENV_POSTGRES_URL) and the pool's key
(ISOENV_POSTGRES_POOL, the template's name). A test's database is claimed with one
statement and given back with another (the protocol in isoenv's README, "Per-test databases
from any language"); isoenv's keeper makes it clean again while the next tests run.
"""

import os
import time
from urllib.parse import urlsplit

import psycopg
import pytest

# The lease is the claiming connection: if this process dies, the keeper sees the holder gone
# and takes the database back.
CLAIM = """UPDATE isoenv_clone SET holder = pg_backend_pid(), since = clock_timestamp()
    WHERE name = (SELECT name FROM isoenv_clone WHERE template = %s
                  AND holder IS NULL AND NOT dirty LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING name"""

RELEASE = """WITH r AS (UPDATE isoenv_clone SET holder = NULL, since = NULL, dirty = true
    WHERE name = %s RETURNING 1) SELECT pg_notify('isoenv_dirty', '') FROM r"""

# Longer than any reset or clone; waiting this long means more tests run at once than the
# pool holds (ISOENV_POOL_SIZE).
CLAIM_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def isoenv_pool():
    """The connection that holds this process's leases, and the pool's key."""
    with psycopg.connect(os.environ["ISOENV_POSTGRES_URL"], autocommit=True) as conn:
        yield conn, os.environ["ISOENV_POSTGRES_POOL"]


@pytest.fixture
def database_url(isoenv_pool):
    """The URL of a database of this test's own, with the migrations applied."""
    admin, template = isoenv_pool
    deadline = time.monotonic() + CLAIM_TIMEOUT_S
    while (row := admin.execute(CLAIM, (template,)).fetchone()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no free database in isoenv's pool after {CLAIM_TIMEOUT_S}s: "
                "more tests at once than ISOENV_POOL_SIZE?"
            )
        time.sleep(0.002)
    name = row[0]
    try:
        yield urlsplit(os.environ["ISOENV_POSTGRES_URL"])._replace(path="/" + name).geturl()
    finally:
        admin.execute(RELEASE, (name,))


@pytest.fixture
def db(database_url):
    """A connection to this test's own database."""
    with psycopg.connect(database_url) as conn:
        yield conn

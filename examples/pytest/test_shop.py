"""Each test sees only what it wrote: run after one another on recycled databases, any row,
sequence value or table a previous test left behind fails them."""

import pytest


@pytest.mark.parametrize("n", range(20))
def test_a_test_sees_only_its_own_rows(db, n):
    customer = db.execute(
        "INSERT INTO customer (email) VALUES (%s) RETURNING id", (f"c{n}@example.com",)
    ).fetchone()[0]
    # The sequence was set back: every test's first customer is number 1.
    assert customer == 1
    db.execute(
        "INSERT INTO orders (customer_id, country, total_cents) VALUES (%s, 'ES', %s)",
        (customer, 100 * n),
    )
    db.commit()
    rows = db.execute(
        "SELECT c.email, o.total_cents, k.name FROM orders o "
        "JOIN customer c ON c.id = o.customer_id JOIN country k ON k.code = o.country"
    ).fetchall()
    assert rows == [(f"c{n}@example.com", 100 * n, "Spain")]


@pytest.mark.parametrize("n", range(5))
def test_seed_rows_and_schema_are_the_templates(db, n):
    # A previous round deleted a seed row and added a table; neither is seen here.
    assert db.execute("SELECT code FROM country ORDER BY code").fetchall() == [("ES",), ("PT",)]
    assert db.execute("SELECT to_regclass('scratch')").fetchone()[0] is None
    db.execute("DELETE FROM country WHERE code = 'PT'")
    db.execute("CREATE TABLE scratch (x int)")
    db.commit()


def test_each_test_has_a_database_of_its_own(database_url, isoenv_pool):
    admin, template = isoenv_pool
    held = admin.execute(
        "SELECT name FROM isoenv_clone WHERE holder = pg_backend_pid()"
    ).fetchall()
    assert [database_url.rsplit("/", 1)[1].split("?")[0]] == [name for (name,) in held]
    assert template.startswith("isoenv_tpl_")

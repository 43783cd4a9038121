-- The schema isoenv's own tests run against (isoenv::testing clones it per test).
CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL);
INSERT INTO accounts (owner) VALUES ('seed');

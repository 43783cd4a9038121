-- The example's schema: what its tests write into, a seeded table, and a sequence each test
-- expects to start at 1 (a database given back clean has its sequences set back).
CREATE TABLE customer (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE
);
CREATE TABLE country (
    code char(2) PRIMARY KEY,
    name text NOT NULL
);
INSERT INTO country VALUES ('ES', 'Spain'), ('PT', 'Portugal');
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customer (id),
    country char(2) NOT NULL REFERENCES country (code),
    total_cents int NOT NULL CHECK (total_cents >= 0)
);
CREATE INDEX orders_customer ON orders (customer_id);

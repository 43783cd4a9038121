-- The schema isoenv's own tests run against (isoenv::testing applies it per test).
CREATE TABLE accounts (id int AUTO_INCREMENT PRIMARY KEY, owner varchar(64) NOT NULL);
INSERT INTO accounts (owner) VALUES ('seed');

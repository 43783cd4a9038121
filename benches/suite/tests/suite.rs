//! The suite `cargo xtask bench --only suite` times: 200 tests (`a000`-`a049` and `b050`-`b199`,
//! so `a` selects the first 50), each inserting a customer, products and an order, joining them
//! and asserting it sees only its own rows, against a database given three ways:
//! - `floor`: one shared database, each test in a transaction it rolls back (no isolation
//!   between committed work; the fastest anything can be);
//! - `isoenv`: `isoenv::testing`, a database of the test's own;
//! - `percreate`: what `#[sqlx::test]` does, `CREATE DATABASE` and the migrations per test,
//!   dropped after.
//! `SUITE_SERVER_URL` names the server (its `postgres` database); the floor's database is
//! `isoenv_suite_floor`, migrated by the bench. `SUITE_HANDOUTS`, if set, is a file each isoenv
//! test appends its handout time (ms) to. The same for MariaDB (`SUITE_MYSQL_URL`, the same
//! schema in its dialect, a database per test) and Redis (`SUITE_REDIS_URL`: a customer hash,
//! an order list, a product set and a counter; the floor prefixes its keys and deletes them, and
//! isoenv's logical database per test must hold exactly the test's own keys).

use std::io::Write;
use std::time::Instant;

use mysql::prelude::Queryable;
use postgres::{Client, GenericClient, NoTls};

fn server(db: &str) -> String {
    let url = std::env::var("SUITE_SERVER_URL").expect("SUITE_SERVER_URL");
    let path = url.rfind("/postgres").expect("a URL of the postgres database");
    format!("{}/{db}{}", &url[..path], &url[path + "/postgres".len()..])
}

fn migrations(engine: &str) -> String {
    let dir = format!("{}/migrations/{engine}", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

fn body(c: &mut impl GenericClient, case: &str) {
    let customer: i64 = c
        .query_one(
            "INSERT INTO customers (name, email) VALUES ($1, $2) RETURNING id",
            &[&case, &format!("{case}@example.com")],
        )
        .unwrap()
        .get(0);
    let address: i64 = c
        .query_one(
            "INSERT INTO addresses (customer_id, line, city, country) VALUES ($1, '1 rue', 'Lyon', 'FR') RETURNING id",
            &[&customer],
        )
        .unwrap()
        .get(0);
    let mut products = Vec::new();
    for (i, price) in ["12.50", "7.25"].iter().enumerate() {
        let id: i64 = c
            .query_one(
                "INSERT INTO products (sku, name, price, category_id) VALUES ($1, $2, $3::text::numeric, 1) RETURNING id",
                &[&format!("{case}-{i}"), &format!("product {i}"), price],
            )
            .unwrap()
            .get(0);
        products.push(id);
    }
    let order: i64 = c
        .query_one(
            "INSERT INTO orders (customer_id, address_id) VALUES ($1, $2) RETURNING id",
            &[&customer, &address],
        )
        .unwrap()
        .get(0);
    for (line, product) in products.iter().enumerate() {
        c.execute(
            "INSERT INTO order_lines (order_id, line, product_id, quantity, price)
             SELECT $1, $2, id, 2, price FROM products WHERE id = $3",
            &[&order, &(line as i32), product],
        )
        .unwrap();
    }
    let row = c
        .query_one(
            "SELECT c.name, count(*), sum(l.quantity * l.price)::text,
                    (SELECT count(*) FROM customers), (SELECT count(*) FROM categories)
             FROM customers c JOIN orders o ON o.customer_id = c.id
             JOIN order_lines l ON l.order_id = o.id JOIN products p ON p.id = l.product_id
             WHERE c.id = $1 GROUP BY c.name",
            &[&customer],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), case);
    assert_eq!(row.get::<_, i64>(1), 2);
    assert_eq!(row.get::<_, String>(2), "39.50");
    assert_eq!(
        row.get::<_, i64>(3),
        1,
        "{case} sees another test's customers"
    );
    assert_eq!(row.get::<_, i64>(4), 2, "{case} lost the seed rows");
}

pub fn floor(case: &str) {
    let mut c = Client::connect(&server("isoenv_suite_floor"), NoTls).unwrap();
    let mut tx = c.transaction().unwrap();
    body(&mut tx, case);
    tx.rollback().unwrap();
}

/// A database from isoenv, its handout time recorded.
fn handout(get: fn() -> ::isoenv::testing::Result<::isoenv::testing::TestDb>) -> ::isoenv::testing::TestDb {
    let t = Instant::now();
    let db = get().unwrap();
    let handout = t.elapsed().as_secs_f64() * 1e3;
    if let Some(path) = std::env::var_os("SUITE_HANDOUTS") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(format!("{handout}\n").as_bytes()).unwrap();
    }
    db
}

pub fn isoenv(case: &str) {
    let db = handout(::isoenv::testing::blocking::postgres);
    let mut c = Client::connect(db.url(), NoTls).unwrap();
    body(&mut c, case);
}

fn mysql_server(db: &str) -> String {
    let url = std::env::var("SUITE_MYSQL_URL").expect("SUITE_MYSQL_URL");
    let path = url.rfind('/').expect("a URL with a database");
    format!("{}/{db}", &url[..path])
}

/// Inserts and returns the new row's id.
fn insert(c: &mut impl Queryable, sql: &str, params: impl Into<mysql::Params>) -> u64 {
    c.exec_drop(sql, params).unwrap();
    c.query_first("SELECT LAST_INSERT_ID()").unwrap().unwrap()
}

fn mysql_body(c: &mut impl Queryable, case: &str) {
    let customer = insert(
        c,
        "INSERT INTO customers (name, email) VALUES (?, ?)",
        (case, format!("{case}@example.com")),
    );
    let address = insert(
        c,
        "INSERT INTO addresses (customer_id, line, city, country) VALUES (?, '1 rue', 'Lyon', 'FR')",
        (customer,),
    );
    let mut products = Vec::new();
    for (i, price) in ["12.50", "7.25"].iter().enumerate() {
        products.push(insert(
            c,
            "INSERT INTO products (sku, name, price, category_id) VALUES (?, ?, ?, 1)",
            (format!("{case}-{i}"), format!("product {i}"), price),
        ));
    }
    let order = insert(
        c,
        "INSERT INTO orders (customer_id, address_id) VALUES (?, ?)",
        (customer, address),
    );
    for (line, product) in products.iter().enumerate() {
        c.exec_drop(
            "INSERT INTO order_lines (order_id, line, product_id, quantity, price)
             SELECT ?, ?, id, 2, price FROM products WHERE id = ?",
            (order, line as u32, product),
        )
        .unwrap();
    }
    let row: (String, i64, String, i64, i64) = c
        .exec_first(
            "SELECT c.name, count(*), CAST(sum(l.quantity * l.price) AS char),
                    (SELECT count(*) FROM customers), (SELECT count(*) FROM categories)
             FROM customers c JOIN orders o ON o.customer_id = c.id
             JOIN order_lines l ON l.order_id = o.id JOIN products p ON p.id = l.product_id
             WHERE c.id = ? GROUP BY c.name",
            (customer,),
        )
        .unwrap()
        .unwrap();
    assert_eq!((row.0.as_str(), row.1, row.2.as_str()), (case, 2, "39.50"));
    assert_eq!(row.3, 1, "{case} sees another test's customers");
    assert_eq!(row.4, 2, "{case} lost the seed rows");
}

pub fn mysql_floor(case: &str) {
    let mut c = mysql::Conn::new(mysql_server("isoenv_suite_floor").as_str()).unwrap();
    let mut tx = c.start_transaction(mysql::TxOpts::default()).unwrap();
    mysql_body(&mut tx, case);
    tx.rollback().unwrap();
}

pub fn mysql_isoenv(case: &str) {
    let db = handout(::isoenv::testing::blocking::mysql);
    let mut c = mysql::Conn::new(db.url()).unwrap();
    mysql_body(&mut c, case);
}

pub fn mysql_percreate(case: &str) {
    let mut admin = mysql::Conn::new(mysql_server("isoenv").as_str()).unwrap();
    let name = format!("suite_{}_{}", std::process::id(), case);
    admin.query_drop(format!("CREATE DATABASE {name}")).unwrap();
    let mut c = mysql::Conn::new(mysql_server(&name).as_str()).unwrap();
    for statement in migrations("mysql").split(';').filter(|s| !s.trim().is_empty()) {
        c.query_drop(statement).unwrap();
    }
    mysql_body(&mut c, case);
    drop(c);
    admin.query_drop(format!("DROP DATABASE {name}")).unwrap();
}

/// Writes a customer, its orders, products and revenue under `prefix`, reads them back; the
/// keys it wrote.
fn redis_body(c: &mut redis::Connection, case: &str, prefix: &str) -> Vec<String> {
    let keys: Vec<String> = ["customer", "orders", "products", "revenue"]
        .iter()
        .map(|k| format!("{prefix}{k}"))
        .collect();
    redis::pipe()
        .cmd("HSET").arg(&keys[0]).arg("name").arg(case).arg("email").arg(format!("{case}@example.com"))
        .cmd("RPUSH").arg(&keys[1]).arg("line-0").arg("line-1")
        .cmd("SADD").arg(&keys[2]).arg(format!("{case}-0")).arg(format!("{case}-1"))
        .cmd("INCRBY").arg(&keys[3]).arg(3950)
        .exec(c)
        .unwrap();
    let (name, lines, products, revenue): (String, i64, i64, i64) = redis::pipe()
        .cmd("HGET").arg(&keys[0]).arg("name")
        .cmd("LLEN").arg(&keys[1])
        .cmd("SCARD").arg(&keys[2])
        .cmd("GET").arg(&keys[3])
        .query(c)
        .unwrap();
    assert_eq!((name.as_str(), lines, products, revenue), (case, 2, 2, 3950));
    keys
}

pub fn redis_floor(case: &str) {
    let url = std::env::var("SUITE_REDIS_URL").expect("SUITE_REDIS_URL");
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let keys = redis_body(&mut c, case, &format!("{case}:"));
    redis::cmd("DEL").arg(&keys).exec(&mut c).unwrap();
}

pub fn redis_isoenv(case: &str) {
    let db = handout(::isoenv::testing::blocking::redis);
    let mut c = redis::Client::open(db.url()).unwrap().get_connection().unwrap();
    redis_body(&mut c, case, "");
    let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(size, 4, "{case} sees another test's keys");
}

pub fn percreate(case: &str) {
    let mut admin = Client::connect(&server("postgres"), NoTls).unwrap();
    let name = format!("suite_{}_{}", std::process::id(), case);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let mut c = Client::connect(&server(&name), NoTls).unwrap();
    c.batch_execute(&migrations("postgres")).unwrap();
    body(&mut c, case);
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .unwrap();
}

// Module names never contain one another, so a filter `MODULE::` selects one variant.
macro_rules! suite {
    ($($case:ident)*) => {
        mod postgres_floor { $(#[test] fn $case() { super::floor(stringify!($case)) })* }
        mod postgres_isoenv { $(#[test] fn $case() { super::isoenv(stringify!($case)) })* }
        mod postgres_percreate { $(#[test] fn $case() { super::percreate(stringify!($case)) })* }
        mod mysql_floor { $(#[test] fn $case() { super::mysql_floor(stringify!($case)) })* }
        mod mysql_isoenv { $(#[test] fn $case() { super::mysql_isoenv(stringify!($case)) })* }
        mod mysql_percreate { $(#[test] fn $case() { super::mysql_percreate(stringify!($case)) })* }
        mod redis_floor { $(#[test] fn $case() { super::redis_floor(stringify!($case)) })* }
        mod redis_isoenv { $(#[test] fn $case() { super::redis_isoenv(stringify!($case)) })* }
    };
}

suite!(
    a000 a001 a002 a003 a004 a005 a006 a007 a008 a009
    a010 a011 a012 a013 a014 a015 a016 a017 a018 a019
    a020 a021 a022 a023 a024 a025 a026 a027 a028 a029
    a030 a031 a032 a033 a034 a035 a036 a037 a038 a039
    a040 a041 a042 a043 a044 a045 a046 a047 a048 a049
    b050 b051 b052 b053 b054 b055 b056 b057 b058 b059
    b060 b061 b062 b063 b064 b065 b066 b067 b068 b069
    b070 b071 b072 b073 b074 b075 b076 b077 b078 b079
    b080 b081 b082 b083 b084 b085 b086 b087 b088 b089
    b090 b091 b092 b093 b094 b095 b096 b097 b098 b099
    b100 b101 b102 b103 b104 b105 b106 b107 b108 b109
    b110 b111 b112 b113 b114 b115 b116 b117 b118 b119
    b120 b121 b122 b123 b124 b125 b126 b127 b128 b129
    b130 b131 b132 b133 b134 b135 b136 b137 b138 b139
    b140 b141 b142 b143 b144 b145 b146 b147 b148 b149
    b150 b151 b152 b153 b154 b155 b156 b157 b158 b159
    b160 b161 b162 b163 b164 b165 b166 b167 b168 b169
    b170 b171 b172 b173 b174 b175 b176 b177 b178 b179
    b180 b181 b182 b183 b184 b185 b186 b187 b188 b189
    b190 b191 b192 b193 b194 b195 b196 b197 b198 b199
);

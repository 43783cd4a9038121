//! Nothing: the suite is `tests/suite.rs`.

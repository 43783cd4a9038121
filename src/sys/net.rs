//! Loopback ports.

use std::net::{Ipv4Addr, TcpListener};

pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A port that was free on 127.0.0.1 a moment ago (the kernel's ephemeral choice).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((LOOPBACK, 0))?.local_addr()?.port())
}

/// Whether something already listens on 127.0.0.1:`port` (or we may not bind it).
pub fn is_taken(port: u16) -> bool {
    TcpListener::bind((LOOPBACK, port)).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_port_is_taken_and_a_free_one_is_not() {
        let l = TcpListener::bind((LOOPBACK, 0)).unwrap();
        assert!(is_taken(l.local_addr().unwrap().port()));
        let p = free_port().unwrap();
        assert!(!is_taken(p));
    }
}

//! Connection limits: at most `max_total` chat connections, and at most
//! `max_per_ip` from one address (addresses in `exempt_networks` have no
//! per-address limit). A connection holds an [`Admitted`] for its
//! lifetime; dropping it gives the place back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub(crate) struct Gate {
    state: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    max_total: usize,
    max_per_ip: usize,
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A place taken; given back on drop.
pub(crate) struct Admitted {
    gate: Arc<Gate>,
    /// The address counted against the per-address limit, if any.
    ip: Option<IpAddr>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Server,
    Address,
}

impl Full {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Full::Server => "the server has too many connections; try again later",
            Full::Address => "too many connections from your address",
        }
    }
}

impl Gate {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            state: Mutex::default(),
        });
        gate.set_limits(max_total, max_per_ip);
        gate
    }

    /// New limits; connections already in stay, even past them.
    pub(crate) fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        let mut counts = self.state.lock().expect("gate poisoned");
        counts.max_total = max_total;
        counts.max_per_ip = max_per_ip;
    }

    /// Take a place for a connection from `ip`; `None` for an address
    /// exempt from the per-address limit (it still counts in the total).
    pub(crate) fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Admitted, Full> {
        let mut counts = self.state.lock().expect("gate poisoned");
        if counts.total >= counts.max_total {
            return Err(Full::Server);
        }
        if let Some(ip) = ip {
            let max_per_ip = counts.max_per_ip;
            let from_ip = counts.per_ip.entry(ip).or_default();
            if *from_ip >= max_per_ip {
                return Err(Full::Address);
            }
            *from_ip += 1;
        }
        counts.total += 1;
        Ok(Admitted {
            gate: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.gate.state.lock().expect("gate poisoned");
        counts.total -= 1;
        let Some(ip) = self.ip else { return };
        if let Some(n) = counts.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_address() {
        let gate = Gate::new(4, 2);
        let (a, b): (Option<IpAddr>, Option<IpAddr>) =
            (Some([10, 0, 0, 1].into()), Some([10, 0, 0, 2].into()));
        let exempt = gate.admit(None).unwrap();
        let _exempt_too = gate.admit(None).unwrap();
        drop(exempt);
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Full::Address));
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Full::Server));
        drop(a1);
        assert!(gate.admit(b).is_ok(), "a place came back");
        assert!(gate.state.lock().unwrap().per_ip.len() <= 2);
    }
}

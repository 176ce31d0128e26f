//! The register workload: concurrent reads, writes and compare-and-sets on a handful of keys.
//!
//! Every written value is unique within its key (a counter per key), which lets the checker
//! tell exactly which write a read saw. A key is retired after `ops_per_key` ops and a fresh one
//! takes its place, so each key's history stays small enough to search, as Jepsen's independent
//! keys do.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::Rng;

use flock_proto::v1::{KvCasRequest, KvGetRequest, KvPutRequest};

use super::{Done, Workload};
use crate::checker::{Checker, RegisterLinearizable};
use crate::client::{classify, Api, Failure};
use crate::history::{Call, Op, Outcome};

/// How the error of a compare-and-set that found another value starts.
pub const CAS_NOT_APPLIED: &str = "cas not applied";

/// How reads are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadMode {
    /// Through the leader's read index: must be linearizable.
    Linearizable,
    /// From the contacted node's replica (`--stale`): may be old, so may not be linearizable.
    Stale,
}

impl ReadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::Linearizable => "linearizable",
            ReadMode::Stale => "stale",
        }
    }
}

/// Settings of the register workload.
#[derive(Clone, Debug)]
pub struct RegisterOptions {
    /// Keys are `<prefix>r<n>`.
    pub prefix: String,
    /// Keys in use at any time.
    pub keys: usize,
    /// Ops on a key before it is retired.
    pub ops_per_key: u64,
    pub read_mode: ReadMode,
    /// Search budget of the checker, per key.
    pub max_steps: u64,
}

struct Slot {
    key: u64,
    issued: u64,
}

#[derive(Default)]
struct KeyState {
    next_value: u64,
    /// The latest value a client learnt of (a read, or its own write).
    last_known: Option<String>,
}

struct State {
    slots: Vec<Slot>,
    next_key: u64,
    keys: HashMap<String, KeyState>,
    used: Vec<String>,
}

/// Reads, writes and compare-and-sets on rotating keys.
pub struct Register {
    opts: RegisterOptions,
    state: Mutex<State>,
}

impl Register {
    pub fn new(opts: RegisterOptions) -> Register {
        let keys = opts.keys.max(1);
        let state = State {
            slots: (0..keys as u64)
                .map(|k| Slot { key: k, issued: 0 })
                .collect(),
            next_key: keys as u64,
            keys: HashMap::new(),
            used: Vec::new(),
        };
        Register {
            opts,
            state: Mutex::new(state),
        }
    }

    fn key_name(&self, id: u64) -> String {
        format!("{}r{id}", self.opts.prefix)
    }
}

impl Workload for Register {
    fn name(&self) -> &'static str {
        "register"
    }

    fn next_call(&self, rng: &mut StdRng) -> Call {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let slot = rng.random_range(0..st.slots.len());
        if st.slots[slot].issued >= self.opts.ops_per_key {
            let id = st.next_key;
            st.next_key += 1;
            st.slots[slot] = Slot { key: id, issued: 0 };
        }
        st.slots[slot].issued += 1;
        let key = self.key_name(st.slots[slot].key);
        if !st.keys.contains_key(&key) {
            st.used.push(key.clone());
        }
        let ks = st.keys.entry(key.clone()).or_default();
        let roll: f64 = rng.random();
        if roll < 0.5 {
            return Call::Read {
                key,
                stale: self.opts.read_mode == ReadMode::Stale,
            };
        }
        ks.next_value += 1;
        let value = ks.next_value.to_string();
        if roll < 0.75 {
            Call::Write { key, value }
        } else {
            // Mostly the latest known value, so that many succeed; sometimes an older one.
            let expect = match &ks.last_known {
                Some(v) if rng.random_bool(0.8) => Some(v.clone()),
                Some(_) if ks.next_value > 2 => {
                    Some(rng.random_range(1..ks.next_value).to_string())
                }
                _ => None,
            };
            Call::Cas { key, expect, value }
        }
    }

    async fn invoke(&self, api: &mut Api, call: &Call) -> Result<Done, Failure> {
        invoke_kv(api, call).await
    }

    fn observe(&self, op: &Op) {
        if op.outcome != Outcome::Ok {
            return;
        }
        let learnt = match (&op.call, &op.read) {
            (Call::Read { .. }, Some(v)) => v.clone(),
            (Call::Write { value, .. }, _) | (Call::Cas { value, .. }, _) => Some(value.clone()),
            _ => return,
        };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ks) = st.keys.get_mut(op.call.key()) {
            ks.last_known = learnt;
        }
    }

    fn final_calls(&self) -> Vec<Call> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.used
            .iter()
            .map(|k| Call::Read {
                key: k.clone(),
                stale: false,
            })
            .collect()
    }

    fn checkers(&self) -> Vec<Box<dyn Checker>> {
        vec![Box::new(RegisterLinearizable {
            max_steps: self.opts.max_steps,
        })]
    }
}

/// Makes a key-value call (read, write or compare-and-set) and says what its answer means.
/// Shared with the runner's recovery probes.
pub(crate) async fn invoke_kv(api: &mut Api, call: &Call) -> Result<Done, Failure> {
    let ok = |read, revision| Done {
        read,
        revision,
        ..Done::ok()
    };
    match call {
        Call::Read { key, stale } => {
            let r = api
                .kv_get(KvGetRequest {
                    key: key.clone(),
                    stale: *stale,
                })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            Ok(ok(Some(r.entry.map(|e| e.value)), Some(r.revision)))
        }
        Call::Write { key, value } => {
            let r = api
                .kv_put(KvPutRequest {
                    key: key.clone(),
                    value: value.clone(),
                })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            Ok(ok(None, r.entry.map(|e| e.mod_revision)))
        }
        Call::Cas { key, expect, value } => {
            let r = api
                .kv_cas(KvCasRequest {
                    key: key.clone(),
                    expect: expect.clone(),
                    value: value.clone(),
                })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            if r.succeeded {
                Ok(ok(None, r.entry.map(|e| e.mod_revision)))
            } else {
                let now = match r.entry {
                    Some(e) => format!("value is {}", e.value),
                    None => "key is absent".to_string(),
                };
                Ok(Done {
                    outcome: Outcome::Fail,
                    note: Some(format!("{CAS_NOT_APPLIED}: {now}")),
                    ..Done::ok()
                })
            }
        }
        other => Err(Failure::Definite(format!(
            "{} is not a key-value call",
            other.f()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn workload(keys: usize, ops_per_key: u64) -> Register {
        Register::new(RegisterOptions {
            prefix: "t/".into(),
            keys,
            ops_per_key,
            read_mode: ReadMode::Linearizable,
            max_steps: 1000,
        })
    }

    #[test]
    fn values_are_unique_per_key_and_keys_rotate() {
        let w = workload(2, 10);
        let mut rng = StdRng::seed_from_u64(1);
        let mut written: HashMap<String, Vec<String>> = HashMap::new();
        for _ in 0..200 {
            match w.next_call(&mut rng) {
                Call::Write { key, value } | Call::Cas { key, value, .. } => {
                    written.entry(key).or_default().push(value)
                }
                _ => {}
            }
        }
        for (key, mut vals) in written {
            let n = vals.len();
            vals.sort();
            vals.dedup();
            assert_eq!(vals.len(), n, "{key} has a value written twice");
        }
        let finals = w.final_calls();
        // 200 ops at 10 per key: about 20 keys, each read at the end.
        assert!(finals.len() >= 19, "{}", finals.len());
        assert!(finals.iter().all(|c| c.is_read()));
    }

    #[test]
    fn cas_expects_what_was_last_seen() {
        let w = workload(1, 1000);
        let mut rng = StdRng::seed_from_u64(3);
        let first = w.next_call(&mut rng);
        let key = first.key().to_string();
        w.observe(&Op {
            index: 0,
            process: 0,
            node: "n1".into(),
            call: Call::Write {
                key: key.clone(),
                value: "77".into(),
            },
            outcome: Outcome::Ok,
            read: None,
            revision: None,
            invoke_ns: 0,
            complete_ns: 1,
            error: None,
            ds: None,
            app: None,
        });
        let mut expects_77 = 0;
        for _ in 0..100 {
            if let Call::Cas { expect, .. } = w.next_call(&mut rng) {
                expects_77 += usize::from(expect.as_deref() == Some("77"));
            }
        }
        assert!(expects_77 > 5, "{expects_77}");
    }
}

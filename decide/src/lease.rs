//! Leases and liveness: when a node may run its stateful apps, and when the leader declares a
//! node down.
//!
//! A node renews its lease every [`LeaseConfig::renew_every`] by asking the leader to confirm
//! its leadership with a quorum (a read index). A renewal sent at `t` on the node's clock and
//! confirmed makes the lease hold until `t + lease` ([`Lease::renewed`]): the node measures from
//! when it *sent* the request, which is before the leader heard it. The leader records when it
//! heard each node ([`Liveness::heard`]) and declares a node down only when it has heard nothing
//! for `lease + drift_margin` ([`Liveness::decide`]). So a node's lease runs out before the
//! leader declares it down, as long as the two clocks' rates differ by less than
//! `drift_margin / lease` (no synchronized wall clocks needed: only elapsed time on each
//! machine, CLOCK_BOOTTIME, which keeps counting during a suspend).
//!
//! A new leader has heard nobody: it counts every node as heard when it took over, so it waits a
//! full `lease + drift_margin` before it declares anyone down. A lease the old leader confirmed
//! was sent before the quorum that confirmed it answered, which is before that quorum elected
//! the new leader: it runs out before the new leader may act.
//!
//! A node declared down is brought back ([`LivenessAction::BackUp`]) only after it has been
//! heard steadily for [`LeaseConfig::stable_after`]: a flapping node does not take work back.

use std::collections::BTreeMap;
use std::time::Duration;

use flock_scheduler::{ClusterState, NodeId, NodeState};

use crate::Instant;

/// The timings of leases and liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a renewal holds (L).
    pub lease: Duration,
    /// How often a node renews.
    pub renew_every: Duration,
    /// Added to the lease before the leader declares a node down: covers clock-rate drift and
    /// the time fencing takes.
    pub drift_margin: Duration,
    /// How long a node declared down must be heard without a gap before it is used again.
    pub stable_after: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease: Duration::from_millis(2500),
            renew_every: Duration::from_millis(400),
            drift_margin: Duration::from_millis(1000),
            stable_after: Duration::from_secs(10),
        }
    }
}

impl LeaseConfig {
    /// Silence after which the leader declares a node down.
    pub fn down_after(&self) -> Duration {
        self.lease + self.drift_margin
    }

    /// Whether the timings keep the guarantee: renewals come several times per lease, and the
    /// margin is positive.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_every.is_zero() || self.renew_every * 2 > self.lease {
            return Err(format!(
                "the lease ({:?}) must be at least twice the renewal period ({:?})",
                self.lease, self.renew_every
            ));
        }
        if self.drift_margin < self.lease / 10 {
            return Err(format!(
                "the drift margin ({:?}) must be at least a tenth of the lease ({:?})",
                self.drift_margin, self.lease
            ));
        }
        Ok(())
    }
}

/// This node's lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    valid_until: Option<Instant>,
}

impl Lease {
    /// A renewal sent at `sent` was confirmed: the lease holds until `sent + lease` (never
    /// shortened by a late answer to an older renewal).
    pub fn renewed(&mut self, sent: Instant, cfg: &LeaseConfig) {
        let until = sent + cfg.lease;
        if self.valid_until.is_none_or(|u| until > u) {
            self.valid_until = Some(until);
        }
    }

    /// Whether the lease holds at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|u| now < u)
    }

    /// How long it still holds at `now` (zero when it does not).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.valid_until
            .map_or(Duration::ZERO, |u| u.saturating_since(now))
    }

    /// The lease ends now (the leader refused a renewal: this node was declared down).
    pub fn revoke(&mut self) {
        self.valid_until = None;
    }
}

/// When the leader heard a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Heard {
    last: Instant,
    /// The start of the current run of renewals without a gap longer than the lease.
    steady_since: Instant,
}

/// What the leader should propose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LivenessAction {
    /// Propose [`flock_scheduler::Command::DeclareNodeDown`]: nothing heard for `silent`.
    DeclareDown {
        node: NodeId,
        silent: Duration,
        /// Asked by an operator (`flockctl node down`).
        by_operator: bool,
    },
    /// Propose [`flock_scheduler::Command::NodeBackUp`].
    BackUp { node: NodeId },
}

/// The leader's view of which nodes are alive. Lives in the leader's memory only.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// Since when this node leads (`None`: it does not).
    leading_since: Option<Instant>,
    heard: BTreeMap<NodeId, Heard>,
    /// When this leader first saw each node an operator declared dead
    /// ([`flock_scheduler::failover::Failover::condemned`]): it renews them no more, and
    /// declares them down once their last lease ran out.
    condemned: BTreeMap<NodeId, Instant>,
    /// Nodes this leader decided to declare down and whose declaration it has not seen
    /// applied: no renewal for them meanwhile (a renewal answered with a read index from before
    /// the declaration would give the node a lease over a state that still makes it primary).
    /// (When decided; forgotten after [`DECLARING_FOR`] if it never applied.)
    declaring: BTreeMap<NodeId, Instant>,
}

/// How long renewals stay refused for a node whose declaration has not applied.
pub const DECLARING_FOR: Duration = Duration::from_secs(10);

impl Liveness {
    pub fn new() -> Liveness {
        Liveness::default()
    }

    /// This node became leader at `now` (or still is: a no-op then).
    pub fn lead(&mut self, now: Instant) {
        if self.leading_since.is_none() {
            self.leading_since = Some(now);
            self.heard.clear();
        }
    }

    /// This node does not lead.
    pub fn follow(&mut self) {
        self.leading_since = None;
        self.heard.clear();
        self.condemned.clear();
        // Kept: the proposal may still commit under the next leader.
    }

    pub fn leading(&self) -> bool {
        self.leading_since.is_some()
    }

    /// A node's request reached the leader at `now`.
    pub fn heard(&mut self, node: NodeId, now: Instant, cfg: &LeaseConfig) {
        let h = self.heard.entry(node).or_insert(Heard {
            last: now,
            steady_since: now,
        });
        if now.saturating_since(h.last) > cfg.lease {
            h.steady_since = now;
        }
        if now > h.last {
            h.last = now;
        }
    }

    /// Whether `node` may renew its lease: not declared down in `state`, not condemned.
    pub fn may_renew(&self, state: &ClusterState, node: NodeId) -> Result<(), String> {
        if state.failover.condemned.contains(&node) {
            return Err("an operator declared this node down".into());
        }
        if self.declaring.contains_key(&node) {
            return Err("the leader is declaring this node down".into());
        }
        // A node declared down may renew: the datasets that failed over have another
        // primary under a newer epoch, which it sees before its renewal counts (the renewal
        // waits for the read index to apply), and those that could not fail over are still
        // its own to serve.
        match state.nodes.get(&node) {
            None => Err("this node is not a member".into()),
            Some(_) => Ok(()),
        }
    }

    /// What the leader should propose at `now`, given the applied `state`. `me` is the
    /// leader itself (never declared down by itself).
    pub fn decide(
        &mut self,
        state: &ClusterState,
        me: NodeId,
        now: Instant,
        cfg: &LeaseConfig,
    ) -> Vec<LivenessAction> {
        // A declaration applied (or the node gone): renewals may be answered again.
        self.declaring.retain(|id, at| {
            now.saturating_since(*at) < DECLARING_FOR
                && state
                    .nodes
                    .get(id)
                    .is_some_and(|n| n.state != NodeState::Down)
        });
        let Some(since) = self.leading_since else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // The leader itself, declared down while it was away, comes back once it has led for
        // a while: nobody else hears it as leader.
        if state.nodes.get(&me).map(|n| n.state) == Some(NodeState::Down)
            && now.saturating_since(since) >= cfg.stable_after
        {
            out.push(LivenessAction::BackUp { node: me });
        }
        self.condemned
            .retain(|id, _| state.failover.condemned.contains(id));
        for id in &state.failover.condemned {
            self.condemned.entry(*id).or_insert(now);
        }
        for node in state.nodes.values() {
            // The leader never declares itself down, unless an operator condemned it: its own
            // renewals are refused too, so its lease runs out like anyone's.
            if node.id == me && !self.condemned.contains_key(&me) {
                continue;
            }
            let heard = self.heard.get(&node.id);
            let last = heard.map_or(since, |h| h.last.max(since));
            let silent = now.saturating_since(last);
            match node.state {
                NodeState::Ready | NodeState::Draining => {
                    let condemned = self.condemned.contains_key(&node.id);
                    // A condemned node got no renewal since it was condemned: its last lease
                    // was sent before then.
                    let lease_over = match self.condemned.get(&node.id) {
                        Some(at) => now.saturating_since((*at).max(since)) >= cfg.down_after(),
                        None => false,
                    };
                    if (silent >= cfg.down_after() && node.id != me) || lease_over {
                        self.declaring.entry(node.id).or_insert(now);
                        out.push(LivenessAction::DeclareDown {
                            node: node.id,
                            silent,
                            by_operator: condemned,
                        });
                    }
                }
                NodeState::Down => {
                    if let Some(h) = heard {
                        let steady = now.saturating_since(h.steady_since);
                        if silent < cfg.lease && steady >= cfg.stable_after {
                            out.push(LivenessAction::BackUp { node: node.id });
                        }
                    }
                }
            }
        }
        out
    }

    /// When the leader last heard `node` (`None`: not since it leads).
    pub fn last_heard(&self, node: NodeId) -> Option<Instant> {
        self.heard.get(&node).map(|h| h.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::cluster;
    use flock_scheduler::Command;

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn cfg() -> LeaseConfig {
        LeaseConfig::default()
    }

    #[test]
    fn a_lease_holds_from_the_send_time_and_is_never_shortened() {
        let c = cfg();
        let mut l = Lease::default();
        assert!(!l.holds(t(0)));
        l.renewed(t(1000), &c);
        assert!(l.holds(t(3499)));
        assert!(!l.holds(t(3500)));
        // A late answer to an older renewal does not shorten it.
        l.renewed(t(500), &c);
        assert!(l.holds(t(3499)));
        assert_eq!(l.remaining(t(3000)), Duration::from_millis(500));
        l.revoke();
        assert!(!l.holds(t(1001)));
    }

    #[test]
    fn the_leader_declares_a_silent_node_down_only_after_lease_and_margin() {
        let c = cfg();
        let s = cluster(3);
        let mut live = Liveness::new();
        assert!(live.decide(&s, 1, t(100_000), &c).is_empty(), "not leading");
        live.lead(t(0));
        // Nobody heard since the leader took over: counted from then.
        assert!(live.decide(&s, 1, t(3499), &c).is_empty());
        live.heard(2, t(3000), &c);
        let acts = live.decide(&s, 1, t(3500), &c);
        assert_eq!(
            acts,
            vec![LivenessAction::DeclareDown {
                node: 3,
                silent: Duration::from_millis(3500),
                by_operator: false
            }]
        );
        // n2 was heard at 3 s: down at 6.5 s, not before.
        assert!(!live
            .decide(&s, 1, t(6499), &c)
            .iter()
            .any(|a| matches!(a, LivenessAction::DeclareDown { node: 2, .. })));
        assert!(live
            .decide(&s, 1, t(6500), &c)
            .iter()
            .any(|a| matches!(a, LivenessAction::DeclareDown { node: 2, .. })));
    }

    #[test]
    fn a_node_comes_back_only_after_steady_renewals() {
        let c = cfg();
        let mut s = cluster(2);
        s.apply(&Command::DeclareNodeDown {
            node: 2,
            last_heard_unix_ms: 0,
            at_unix_ms: 0,
            by_operator: false,
        });
        let mut live = Liveness::new();
        live.lead(t(0));
        assert!(live.may_renew(&s, 2).is_ok());
        let mut now = 0;
        // Flapping: heard, then a gap longer than the lease, again and again.
        for _ in 0..5 {
            for _ in 0..10 {
                now += 400;
                live.heard(2, t(now), &c);
                assert!(live.decide(&s, 1, t(now), &c).is_empty());
            }
            now += 3000;
        }
        // Steady for stable_after: back up.
        let start = now;
        loop {
            now += 400;
            live.heard(2, t(now), &c);
            let acts = live.decide(&s, 1, t(now), &c);
            if !acts.is_empty() {
                assert_eq!(acts, vec![LivenessAction::BackUp { node: 2 }]);
                break;
            }
            assert!(now - start < 11_000, "never came back");
        }
        assert!(now - start >= 10_000);
    }

    #[test]
    fn an_operator_condemned_node_is_declared_once_its_last_lease_ran_out() {
        let c = cfg();
        let s = cluster(2);
        let mut live = Liveness::new();
        live.lead(t(0));
        live.heard(2, t(1000), &c);
        let mut s = s;
        s.apply(&Command::CondemnNode { node: 2 });
        assert!(live.may_renew(&s, 2).is_err());
        assert!(live.decide(&s, 1, t(1000), &c).is_empty());
        // Still heard (it is alive after all), but its renewals are refused.
        live.heard(2, t(2000), &c);
        assert!(live.decide(&s, 1, t(4499), &c).is_empty());
        assert_eq!(
            live.decide(&s, 1, t(4500), &c),
            vec![LivenessAction::DeclareDown {
                node: 2,
                silent: Duration::from_millis(2500),
                by_operator: true
            }]
        );
    }

    /// A renewal that reaches the leader after it decided to declare the node down, before
    /// the declaration applied, is refused (sim seed 71 of the failover model).
    #[test]
    fn no_renewal_while_a_declaration_is_on_its_way() {
        let c = cfg();
        let mut s = cluster(2);
        let mut live = Liveness::new();
        live.lead(t(0));
        assert_eq!(live.decide(&s, 1, t(3500), &c).len(), 1);
        assert!(live.may_renew(&s, 2).is_err());
        s.apply(&Command::DeclareNodeDown {
            node: 2,
            last_heard_unix_ms: 0,
            at_unix_ms: 0,
            by_operator: false,
        });
        live.decide(&s, 1, t(3600), &c);
        assert!(live.may_renew(&s, 2).is_ok());
    }

    /// A leader that was declared down while away brings itself back after leading for a
    /// while (sim seed 1).
    #[test]
    fn a_leader_declared_down_brings_itself_back() {
        let c = cfg();
        let mut s = cluster(2);
        s.apply(&Command::DeclareNodeDown {
            node: 1,
            last_heard_unix_ms: 0,
            at_unix_ms: 0,
            by_operator: false,
        });
        let mut live = Liveness::new();
        live.lead(t(0));
        live.heard(2, t(9_000), &c);
        assert!(!live
            .decide(&s, 1, t(9_999), &c)
            .contains(&LivenessAction::BackUp { node: 1 }));
        assert!(live
            .decide(&s, 1, t(10_000), &c)
            .contains(&LivenessAction::BackUp { node: 1 }));
    }

    /// `flockctl node down` of the leader itself: it declares itself down once its own last
    /// lease ran out (else its apps stay fenced and never fail over).
    #[test]
    fn a_condemned_leader_declares_itself_down() {
        let c = cfg();
        let mut s = cluster(2);
        let mut live = Liveness::new();
        live.lead(t(0));
        live.heard(2, t(4000), &c);
        s.apply(&Command::CondemnNode { node: 1 });
        assert!(live.decide(&s, 1, t(4000), &c).is_empty());
        live.heard(2, t(7400), &c);
        assert!(live.decide(&s, 1, t(7499), &c).is_empty());
        assert_eq!(
            live.decide(&s, 1, t(7500), &c),
            vec![LivenessAction::DeclareDown {
                node: 1,
                silent: Duration::from_millis(7500),
                by_operator: true
            }]
        );
    }

    #[test]
    fn a_new_leader_forgets_what_it_heard_as_a_follower() {
        let c = cfg();
        let s = cluster(2);
        let mut live = Liveness::new();
        live.lead(t(0));
        live.heard(2, t(100), &c);
        live.follow();
        live.lead(t(10_000));
        assert!(live.decide(&s, 1, t(13_499), &c).is_empty());
        assert_eq!(live.decide(&s, 1, t(13_500), &c).len(), 1);
    }

    /// xorshift64: enough randomness for timings, no dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The safety argument, checked over random timings: whenever the leader declares a node
    /// down, that node's lease has run out on its own clock, even when its clock runs up to
    /// drift_margin/lease slower, and whatever the network delays.
    #[test]
    fn a_lease_always_ends_before_the_node_is_declared_down() {
        let c = cfg();
        let s = cluster(2);
        for seed in 0..300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            // The node's clock runs at `rate` of real time (slower is the dangerous side).
            let rate = 1.0 - rng.below(300) as f64 / 1000.0;
            let node_clock = |real: u64| (real as f64 * rate) as u64;
            let mut live = Liveness::new();
            live.lead(t(0));
            let mut lease = Lease::default();
            let mut real = 0u64;
            let stop = 1_000 + rng.below(19_000);
            let mut declared_at = None;
            while declared_at.is_none() && real < 60_000 {
                real += 1 + rng.below(c.renew_every.as_millis() as u64);
                if real < stop {
                    // A renewal: sent now, heard after a delay, answered after another.
                    let sent = node_clock(real);
                    let heard = real + rng.below(800);
                    live.heard(2, t(heard), &c);
                    if heard < stop {
                        lease.renewed(t(sent), &c);
                    }
                }
                if live
                    .decide(&s, 1, t(real), &c)
                    .iter()
                    .any(|a| matches!(a, LivenessAction::DeclareDown { node: 2, .. }))
                {
                    declared_at = Some(real);
                }
            }
            let at = declared_at.expect("declared down at last");
            let rate_ok =
                (1.0 - rate) * c.lease.as_millis() as f64 <= c.drift_margin.as_millis() as f64;
            if rate_ok {
                assert!(
                    !lease.holds(t(node_clock(at))),
                    "seed {seed}: declared down at {at} ms while the node's lease held"
                );
            }
        }
    }
}

//! A node's Prometheus metrics: one registry per node (several nodes may share a process, as
//! `flockd dev` does), rendered in the text exposition format by `--metrics-addr` and by the
//! `Metrics` RPC (what `flockctl ui` reads).

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The metrics of one node. Parts of the node hold an `Arc<Metrics>` and update the series
/// they own; rendering reads them all.
pub struct Metrics {
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The registry of a node with the `flock_` prefix and its build info.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("flock");
        let info: Gauge = Gauge::default();
        info.set(1);
        registry.register(
            "build_info",
            "flockd's version (the value is always 1)",
            info,
        );
        Arc::new(Metrics { registry })
    }

    /// The registry, to register more series while the node starts.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Every series in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

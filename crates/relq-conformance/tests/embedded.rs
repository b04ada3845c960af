//! The conformance suite on the embedded engine, each test in a fresh data directory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

fn fresh_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "relq-conformance-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn open() -> relq::Broker {
    // Small segments so rollover and retention run in these short tests.
    let config = relq::EmbeddedConfig::default().segment_size(64 * 1024);
    relq::Broker::new(relq::EmbeddedBackend::open_with(fresh_dir(), config).expect("open"))
}

relq_conformance::conformance_suite!(real, open());

/// The same suite with a resident window of zero: every retry and delayed message waits in the
/// state database's spill table instead of memory, and reads take it back when it is due.
mod spilling {
    fn open() -> relq::Broker {
        let config = relq::EmbeddedConfig::default()
            .segment_size(64 * 1024)
            .resident_window(std::time::Duration::ZERO);
        relq::Broker::new(
            relq::EmbeddedBackend::open_with(super::fresh_dir(), config).expect("open"),
        )
    }

    relq_conformance::conformance_suite!(real, open());
}

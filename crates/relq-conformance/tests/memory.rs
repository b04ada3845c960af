//! The conformance suite against the in-memory backend, on tokio's paused clock.

relq_conformance::conformance_suite!(paused, relq::Broker::memory());

//! Stream processors: stateless functions (filter, project, route) and event-time
//! windows (tumbling, hopping, session) over Arrow `RecordBatch`es.
//!
//! # Status
//! Nothing lives here yet: today every stream lands unchanged in the lake table of the
//! same name (see `ARCHITECTURE.md`). Functions and windows arrive with issue 3, as
//! `src/filter.rs`, `src/project.rs` and `src/window/{tumbling,hopping,session}.rs`.

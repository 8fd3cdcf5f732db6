//! The Sluice engine behind `sluice run`: the lake task (functions, windows and alerts
//! over the sources' batches, Parquet files, checkpoints committed to Delta tables),
//! the service that starts the HTTP API, the embedded broker, the sources and lake
//! upkeep and stops them in order, and the bounded run over files. The `sluice` binary
//! parses the command line and calls [`serve`] or [`run_files`]. See ARCHITECTURE.md.

mod console;
mod http;
mod https;
mod lake;
pub mod pipeline;
mod queries;
mod service;
mod tap_client;
mod tokens;

pub use lake::lake_column_problems;
pub use service::{cluster_view, lake_location, run_files, serve};
pub use tap_client::{TapRequest, tap};
pub use tokens::new_token;

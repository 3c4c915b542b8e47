//! keel's event contracts.
//!
//! A contract is an `.avsc` file under `schemas/avro/<namespace>/<Name>.avsc`; once published it
//! is never edited in place. The Rust types here mirror the files field for field, and every type
//! round-trips through its schema in the tests below.
//!
//! # Layout
//! - [`events`]: the Rust types of the contracts and the [`Event`] enum over them.
//! - [`codec`]: Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro body)
//!   through a Confluent-compatible registry, with `schema_registry_converter`.
//! - [`history`]: published versions in the repository and the offline compatibility check
//!   (`keel schema check`).
//! - [`registry`]: keel's own Confluent-compatible Schema Registry (REST API backed by
//!   PostgreSQL), the local default where Confluent's is not running.
//!
//! # Subject naming
//! Every event of an order goes to one topic (`orders`) so that Kafka keeps their order. One
//! topic therefore carries several record types, so subjects follow Confluent's
//! `TopicRecordNameStrategy`: `<topic>-<record full name>`, e.g. `orders-keel.orders.OrderPaid`.
//! Each record type evolves under its own subject and compatibility rules.

pub mod codec;
pub mod events;
pub mod history;
pub mod registry;

pub use codec::{DecodeError, Decoder, EncodeError, Encoder, Written, write, write_under};
pub use events::{
    Customer, Event, InventoryRejected, InventoryReserved, OrderCancelled, OrderCreated, OrderLine,
    OrderPaid, Shortage, StockLine,
};

/// The subject a record type is registered under on `topic` (`TopicRecordNameStrategy`).
pub fn subject(topic: &str, record_full_name: &str) -> String {
    format!("{topic}-{record_full_name}")
}

//! Rust types of the contracts. Field names and types match the `.avsc` files exactly; the
//! round-trip tests at the bottom fail if they drift apart.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A contract: a Rust type and the schema it is encoded with.
pub trait Contract: Serialize + for<'de> Deserialize<'de> {
    /// The record's full name, `namespace.Name`.
    const NAME: &'static str;
    /// The `.avsc` text.
    const SCHEMA: &'static str;
}

macro_rules! contract {
    ($ty:ident, $namespace:literal) => {
        impl Contract for $ty {
            const NAME: &'static str = concat!($namespace, ".", stringify!($ty));
            const SCHEMA: &'static str = include_str!(concat!(
                "../avro/",
                $namespace,
                "/",
                stringify!($ty),
                ".avsc"
            ));
        }
    };
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub email: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    /// Milliseconds since the Unix epoch (`timestamp-millis`).
    pub occurred_at: i64,
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub order_version: i32,
    pub customer: Customer,
    pub currency: String,
    pub lines: Vec<OrderLine>,
    pub total_minor: i64,
    /// Since version 2 of the contract; `"web"` in data written with version 1.
    pub channel: String,
}
contract!(OrderCreated, "keel.orders");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPaid {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub order_version: i32,
    pub customer_id: String,
    pub currency: String,
    pub amount_minor: i64,
    pub payment_reference: String,
}
contract!(OrderPaid, "keel.orders");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub order_version: i32,
    pub customer_id: String,
    pub reason: Option<String>,
    pub lines: Vec<OrderLine>,
}
contract!(OrderCancelled, "keel.orders");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    pub sku: String,
    pub quantity: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<StockLine>,
}
contract!(InventoryReserved, "keel.inventory");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortage {
    pub sku: String,
    pub requested: i32,
    pub available: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryRejected {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub customer_id: String,
    pub shortages: Vec<Shortage>,
}
contract!(InventoryRejected, "keel.inventory");

/// Avro's `uuid` logical type annotates a *string*; serde's default for `Uuid` in a
/// non-human-readable format (which Avro's serializer is) would be 16 bytes.
mod uuid_string {
    use serde::de::{Error, Visitor};
    use uuid::Uuid;

    pub fn serialize<S: serde::Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Uuid;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a UUID as a string or 16 bytes")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Uuid, E> {
                Uuid::parse_str(v).map_err(E::custom)
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Uuid, E> {
                Uuid::from_slice(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Declares [`Event`] over the contract types, with [`CONTRACTS`] and the accessors every
/// variant shares: one list to extend when a contract is added.
macro_rules! events {
    ($($ty:ident),+ $(,)?) => {
        /// Every event keel knows. The outbox stores an `Event` as its Avro body under the
        /// variant's schema ([`crate::write`]), which the relay publishes as written; consumers
        /// decode into it by the writer schema's record name.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Event {
            $($ty($ty),)+
        }

        /// Every contract, in a stable order.
        pub const CONTRACTS: &[ContractInfo] = &[
            $(ContractInfo { name: $ty::NAME, schema: $ty::SCHEMA },)+
        ];

        impl Event {
            /// The record's full name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Event::$ty(_) => $ty::NAME,)+
                }
            }

            pub fn schema(&self) -> &'static str {
                match self {
                    $(Event::$ty(_) => $ty::SCHEMA,)+
                }
            }

            pub fn event_id(&self) -> Uuid {
                match self {
                    $(Event::$ty(e) => e.event_id,)+
                }
            }

            /// The aggregate the event belongs to: the Kafka key, so one order's events share a
            /// partition.
            pub fn aggregate_id(&self) -> Uuid {
                match self {
                    $(Event::$ty(e) => e.order_id,)+
                }
            }

            pub fn occurred_at(&self) -> i64 {
                match self {
                    $(Event::$ty(e) => e.occurred_at,)+
                }
            }

            /// Serializes the variant's payload (without the enum wrapper), as its schema expects.
            pub fn serialize_payload<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(Event::$ty(e) => e.serialize(s),)+
                }
            }

            /// Builds the event from a decoded Avro value whose writer record is named `name`.
            pub(crate) fn from_avro(
                name: &str,
                value: &apache_avro::types::Value,
            ) -> Option<Result<Event, apache_avro::Error>> {
                match name {
                    $(n if n == $ty::NAME => Some(apache_avro::from_value::<$ty>(value).map(Event::$ty)),)+
                    _ => None,
                }
            }
        }
    };
}

events!(
    OrderCreated,
    OrderPaid,
    OrderCancelled,
    InventoryReserved,
    InventoryRejected,
);

impl Event {
    /// The order's version after this event, for events the order service writes.
    pub fn order_version(&self) -> Option<i32> {
        match self {
            Event::OrderCreated(e) => Some(e.order_version),
            Event::OrderPaid(e) => Some(e.order_version),
            Event::OrderCancelled(e) => Some(e.order_version),
            Event::InventoryReserved(_) | Event::InventoryRejected(_) => None,
        }
    }

    /// Whether the order service wrote this event (topic `orders`).
    pub fn is_order_event(&self) -> bool {
        self.order_version().is_some()
    }
}

/// A contract's name and schema, for registration and checks.
#[derive(Debug, Clone, Copy)]
pub struct ContractInfo {
    pub name: &'static str,
    pub schema: &'static str,
}

impl ContractInfo {
    /// The record's namespace: `keel.orders` for `keel.orders.OrderPaid`.
    pub fn namespace(&self) -> &'static str {
        self.name.rsplit_once('.').map_or("", |(ns, _)| ns)
    }
}

/// The variant's payload as a `Serialize` value (what the Avro writer needs).
pub struct Payload<'a>(pub &'a Event);

impl Serialize for Payload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_payload(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::Schema;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;

    fn lines() -> Vec<OrderLine> {
        vec![
            OrderLine {
                sku: "SKU-1".into(),
                quantity: 2,
                unit_price_minor: 1999,
            },
            OrderLine {
                sku: "SKU-2".into(),
                quantity: 1,
                unit_price_minor: 500,
            },
        ]
    }

    pub(crate) fn samples() -> Vec<Event> {
        let order_id = Uuid::new_v4();
        vec![
            Event::OrderCreated(OrderCreated {
                event_id: Uuid::new_v4(),
                occurred_at: 1_764_000_000_123,
                order_id,
                order_version: 1,
                customer: Customer {
                    id: "c-1".into(),
                    email: "ada@example.com".into(),
                    name: "Ada Lovelace ✓".into(),
                },
                currency: "EUR".into(),
                lines: lines(),
                total_minor: 4498,
                channel: "mobile".into(),
            }),
            Event::OrderPaid(OrderPaid {
                event_id: Uuid::new_v4(),
                occurred_at: 1_764_000_001_000,
                order_id,
                order_version: 2,
                customer_id: "c-1".into(),
                currency: "EUR".into(),
                amount_minor: 4498,
                payment_reference: "pay-123".into(),
            }),
            Event::OrderCancelled(OrderCancelled {
                event_id: Uuid::new_v4(),
                occurred_at: 1_764_000_002_000,
                order_id,
                order_version: 2,
                customer_id: "c-1".into(),
                reason: Some("changed my mind".into()),
                lines: lines(),
            }),
            Event::OrderCancelled(OrderCancelled {
                event_id: Uuid::new_v4(),
                occurred_at: 1_764_000_002_000,
                order_id,
                order_version: 3,
                customer_id: "c-1".into(),
                reason: None,
                lines: vec![],
            }),
            Event::InventoryReserved(InventoryReserved {
                event_id: Uuid::new_v4(),
                occurred_at: 1_764_000_000_500,
                order_id,
                customer_id: "c-1".into(),
                lines: vec![StockLine {
                    sku: "SKU-1".into(),
                    quantity: 2,
                }],
            }),
            Event::InventoryRejected(InventoryRejected {
                event_id: Uuid::new_v4(),
                occurred_at: 1_764_000_000_500,
                order_id,
                customer_id: "c-1".into(),
                shortages: vec![Shortage {
                    sku: "SKU-9".into(),
                    requested: 20000,
                    available: 10000,
                }],
            }),
        ]
    }

    /// Every event encodes with its own schema and decodes back to the same value: the Rust type
    /// and the `.avsc` agree on every field's name and type.
    #[test]
    fn every_event_round_trips_through_its_schema() {
        for event in samples() {
            let schema = Schema::parse_str(event.schema()).unwrap();
            // The same schema-directed serde path the registry encoder takes.
            let bytes = GenericDatumWriter::builder(&schema)
                .build()
                .unwrap()
                .write_ser_to_vec(&Payload(&event))
                .unwrap();
            let read = GenericDatumReader::builder(&schema)
                .build()
                .unwrap()
                .read_value(&mut bytes.as_slice())
                .unwrap();
            let back = crate::codec::event_from_value(event.name(), &read).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn every_contract_parses_and_is_named_like_its_file() {
        for c in CONTRACTS {
            let schema = Schema::parse_str(c.schema).unwrap();
            match schema {
                Schema::Record(r) => assert_eq!(r.name.fullname(None), c.name),
                other => panic!("{} is not a record: {other:?}", c.name),
            }
        }
    }
}

//! What an order is and which requests are acceptable.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::FieldError;

/// ISO 4217 alphabetic codes of currencies in use. Anything else is refused: a typo in a currency
/// is a real bug in a caller, not something to carry into every consumer.
pub const CURRENCIES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
    "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
    "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
    "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
    "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VES",
    "VND", "VUV", "WST", "XAF", "XCD", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Per unit, in minor units: ten billion major units of anything is not a shop order.
pub const MAX_UNIT_PRICE_MINOR: i64 = 1_000_000_000_000;

/// `POST /orders`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    pub customer: NewCustomer,
    pub currency: String,
    pub lines: Vec<NewLine>,
    /// Where the order was placed; `"web"` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCustomer {
    pub id: String,
    pub email: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLine {
    pub sku: String,
    /// Read wide so that a negative or huge number is a validation message, not a type error.
    pub quantity: i64,
    pub unit_price_minor: i64,
}

/// `POST /orders/{id}/pay` (body optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub payment_reference: Option<String>,
}

/// `POST /orders/{id}/cancel` (body optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancellation {
    pub reason: Option<String>,
}

/// A validated order request.
#[derive(Debug, Clone)]
pub struct ValidOrder {
    pub customer: keel_schemas::Customer,
    pub currency: String,
    pub lines: Vec<keel_schemas::OrderLine>,
    pub total_minor: i64,
    pub channel: String,
}

/// The channel of an order that names none.
pub const DEFAULT_CHANNEL: &str = "web";

fn text(errors: &mut Vec<FieldError>, field: &str, value: &str, max: usize) {
    if value.trim().is_empty() {
        errors.push(FieldError::new(field, "must not be empty"));
    } else if value.chars().count() > max {
        errors.push(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    } else if value.chars().any(char::is_control) {
        errors.push(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
}

/// Validates every field; returns all problems at once.
pub fn validate(order: &NewOrder) -> Result<ValidOrder, Vec<FieldError>> {
    let mut errors = Vec::new();
    text(&mut errors, "customer.id", &order.customer.id, 100);
    text(&mut errors, "customer.name", &order.customer.name, 200);
    text(&mut errors, "customer.email", &order.customer.email, 254);
    let email = order.customer.email.trim();
    if !email.is_empty()
        && !matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.') && !email.contains(char::is_whitespace))
    {
        errors.push(FieldError::new(
            "customer.email",
            "must be an email address like name@example.com",
        ));
    }
    if !CURRENCIES.contains(&order.currency.as_str()) {
        errors.push(FieldError::new(
            "currency",
            format!(
                "unknown currency {:?}: use an ISO 4217 code such as EUR or USD",
                order.currency
            ),
        ));
    }
    if order.lines.is_empty() {
        errors.push(FieldError::new("lines", "must contain at least one line"));
    } else if order.lines.len() > MAX_LINES {
        errors.push(FieldError::new(
            "lines",
            format!("must contain at most {MAX_LINES} lines"),
        ));
    }
    let mut total: Option<i64> = Some(0);
    for (i, line) in order.lines.iter().enumerate() {
        text(&mut errors, &format!("lines[{i}].sku"), &line.sku, 64);
        if !(1..=MAX_QUANTITY).contains(&line.quantity) {
            errors.push(FieldError::new(
                format!("lines[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
        if !(0..=MAX_UNIT_PRICE_MINOR).contains(&line.unit_price_minor) {
            errors.push(FieldError::new(
                format!("lines[{i}].unit_price_minor"),
                format!("must be between 0 and {MAX_UNIT_PRICE_MINOR}"),
            ));
        }
        total =
            total.and_then(|t| t.checked_add(line.quantity.checked_mul(line.unit_price_minor)?));
    }
    if let Some(channel) = &order.channel {
        text(&mut errors, "channel", channel, 32);
    }
    if total.is_none() && errors.is_empty() {
        errors.push(FieldError::new("lines", "order total is too large"));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ValidOrder {
        customer: keel_schemas::Customer {
            id: order.customer.id.trim().to_owned(),
            email: email.to_owned(),
            name: order.customer.name.trim().to_owned(),
        },
        currency: order.currency.clone(),
        lines: order
            .lines
            .iter()
            .map(|l| keel_schemas::OrderLine {
                sku: l.sku.trim().to_owned(),
                // In range: checked above.
                quantity: i32::try_from(l.quantity).unwrap_or(i32::MAX),
                unit_price_minor: l.unit_price_minor,
            })
            .collect(),
        total_minor: total.unwrap_or(0),
        channel: order
            .channel
            .as_deref()
            .map_or(DEFAULT_CHANNEL, str::trim)
            .to_owned(),
    })
}

/// An optional free-text field of pay/cancel.
pub fn optional_text(
    field: &str,
    value: Option<&str>,
    max: usize,
) -> Result<Option<String>, Vec<FieldError>> {
    match value {
        None => Ok(None),
        Some(v) => {
            let mut errors = Vec::new();
            text(&mut errors, field, v, max);
            if errors.is_empty() {
                Ok(Some(v.trim().to_owned()))
            } else {
                Err(errors)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Paid,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Paid => "paid",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(Status::Created),
            "paid" => Some(Status::Paid),
            "cancelled" => Some(Status::Cancelled),
            _ => None,
        }
    }

    /// Only a created order can be paid or cancelled; the message says why not otherwise.
    pub fn check_transition(self, to: Status) -> Result<(), String> {
        match (self, to) {
            (Status::Created, Status::Paid | Status::Cancelled) => Ok(()),
            (from, to) => Err(format!(
                "order is {}; it cannot become {}",
                from.as_str(),
                to.as_str()
            )),
        }
    }
}

/// An order as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    pub id: Uuid,
    pub status: Status,
    pub version: i32,
    pub customer: keel_schemas::Customer,
    pub currency: String,
    pub lines: Vec<keel_schemas::OrderLine>,
    pub total_minor: i64,
    pub channel: String,
    pub payment_reference: Option<String>,
    pub cancel_reason: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> NewOrder {
        NewOrder {
            customer: NewCustomer {
                id: "c-1".into(),
                email: "ada@example.com".into(),
                name: "Ada".into(),
            },
            currency: "EUR".into(),
            lines: vec![NewLine {
                sku: "SKU-1".into(),
                quantity: 2,
                unit_price_minor: 1999,
            }],
            channel: None,
        }
    }

    fn fields(o: &NewOrder) -> Vec<String> {
        validate(o)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_good_order_is_valid_and_totalled() {
        let v = validate(&order()).unwrap();
        assert_eq!(v.total_minor, 3998);
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut o = order();
        o.lines[0].quantity = -1;
        assert_eq!(fields(&o), ["lines[0].quantity"]);
        let mut o = order();
        o.currency = "EUX".into();
        assert_eq!(fields(&o), ["currency"]);
        let mut o = order();
        o.customer.email = "not-an-email".into();
        o.lines.clear();
        assert_eq!(fields(&o), ["customer.email", "lines"]);
        let mut o = order();
        o.lines[0].sku = " ".into();
        o.lines[0].unit_price_minor = -5;
        assert_eq!(fields(&o), ["lines[0].sku", "lines[0].unit_price_minor"]);
        let mut o = order();
        o.lines = (0..101).map(|_| o.lines[0].clone()).collect();
        assert_eq!(fields(&o), ["lines"]);
        let mut o = order();
        o.lines = vec![
            NewLine {
                sku: "A".into(),
                quantity: MAX_QUANTITY,
                unit_price_minor: MAX_UNIT_PRICE_MINOR
            };
            100
        ];
        // Each product (10^18) fits in i64; their sum (10^20) does not, and is refused.
        assert_eq!(fields(&o), ["lines"]);
    }

    #[test]
    fn only_created_orders_change_state() {
        assert!(Status::Created.check_transition(Status::Paid).is_ok());
        assert!(Status::Created.check_transition(Status::Cancelled).is_ok());
        assert!(
            Status::Cancelled
                .check_transition(Status::Paid)
                .unwrap_err()
                .contains("cancelled")
        );
        assert!(Status::Paid.check_transition(Status::Cancelled).is_err());
        assert!(Status::Paid.check_transition(Status::Paid).is_err());
    }
}

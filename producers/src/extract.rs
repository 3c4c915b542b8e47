//! `JsonBody<T>`: like axum's `Json`, but every rejection is a JSON error naming the field
//! (`lines[0].quantity`), and the size limit answers 413 rather than dropping the connection.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};

/// The largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct JsonBody<T>(pub T);

/// An optional JSON body: an empty body is `None`, anything else must parse.
pub struct OptionalJsonBody<T>(pub Option<T>);

async fn read(req: Request) -> Result<(bool, Bytes), ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(Body::new(req.into_body()), MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(MAX_BODY_BYTES))?;
    let is_json = content_type.as_deref().is_some_and(|ct| {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"))
    });
    Ok((is_json, bytes))
}

/// Parses `bytes`, turning serde's errors into field paths.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return ApiError::MalformedJson(inner.to_string());
        }
        let message = inner.to_string();
        // serde reports a missing field at its parent's path: name the field itself. (An unknown
        // field's path already ends with its name.)
        let named = |m: &str, marker: &str| -> Option<String> {
            let rest = m.strip_prefix(marker)?;
            let name = rest.split('`').next()?;
            Some(if path == "." {
                name.to_owned()
            } else {
                format!("{path}.{name}")
            })
        };
        let field = named(&message, "missing field `").unwrap_or_else(|| {
            if path == "." {
                "body".to_owned()
            } else {
                path.clone()
            }
        });
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        ApiError::Invalid(vec![FieldError::new(field, message)])
    })
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let (is_json, bytes) = read(req).await?;
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let (is_json, bytes) = read(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(None));
        }
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse(&bytes).map(|v| OptionalJsonBody(Some(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        items: Vec<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        qty: i64,
    }

    fn field_of(body: &str) -> String {
        match parse::<Outer>(body.as_bytes()) {
            Err(ApiError::Invalid(f)) => f[0].field.clone(),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn errors_name_the_field_at_fault() {
        assert_eq!(field_of(r#"{"items": []}"#), "name");
        assert_eq!(
            field_of(r#"{"name": "x", "items": [{"qty": 1}, {}]}"#),
            "items[1].qty"
        );
        assert_eq!(
            field_of(r#"{"name": "x", "items": [{"qty": "two"}]}"#),
            "items[0].qty"
        );
        assert_eq!(
            field_of(r#"{"name": "x", "items": [], "extra": 1}"#),
            "extra"
        );
        assert_eq!(field_of(r#""just a string""#), "body");
        assert!(matches!(
            parse::<Outer>(b"{\"name\": "),
            Err(ApiError::MalformedJson(_))
        ));
    }
}

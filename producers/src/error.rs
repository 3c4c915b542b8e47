//! Errors of the order API and their HTTP mapping, in one place.
//!
//! Every error body is JSON: `{"error": <code>, "message": <text>, "field": <path or null>,
//! "details": [{"field", "message"}, ...]}`. User errors (4xx) name the field at fault;
//! unexpected ones (5xx) are logged with their cause and answered without it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

/// One problem with one field of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all.
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// JSON, but not an acceptable request: the fields at fault.
    #[error("request is invalid: {}", .0.first().map(|f| format!("{}: {}", f.field, f.message)).unwrap_or_default())]
    Invalid(Vec<FieldError>),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("order {0} not found")]
    NotFound(String),
    /// The request is valid but the order's state does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// PostgreSQL cannot be reached: the caller may retry.
    #[error("the database is unavailable; retry later")]
    Unavailable,
    #[error("too many requests in progress; retry later")]
    Overloaded,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if keel_core::db::is_unavailable(&e) {
            ApiError::Unavailable
        } else {
            ApiError::Unexpected(e.into())
        }
    }
}

impl ApiError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid(vec![FieldError::new(field, message)])
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::Unexpected(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Unexpected(e) = &self {
            tracing::error!(error = ?e, "Request failed unexpectedly");
        }
        let details = match &self {
            ApiError::Invalid(fields) => fields.clone(),
            ApiError::UnsupportedMediaType => {
                vec![FieldError::new("Content-Type", "must be application/json")]
            }
            _ => vec![],
        };
        let message = match &self {
            ApiError::Unexpected(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        let field = details.first().map(|f| f.field.clone());
        let body = json!({ "error": code, "message": message, "field": field, "details": details });
        (status, Json(body)).into_response()
    }
}

//! MLflow's error contract: a JSON body `{"error_code", "message",
//! "error_class", "sqlstate"}` with the HTTP status MLflow uses for each code.
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered to a tracking API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    /// INVALID_PARAMETER_VALUE (400).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
    }
    /// RESOURCE_DOES_NOT_EXIST (404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "RESOURCE_DOES_NOT_EXIST", message)
    }
    /// RESOURCE_ALREADY_EXISTS (400, as MLflow answers it).
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "RESOURCE_ALREADY_EXISTS", message)
    }
    /// BAD_REQUEST (400): malformed JSON or a missing body.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }
    /// UNAUTHENTICATED (401).
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", message)
    }
    /// PERMISSION_DENIED (403).
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "PERMISSION_DENIED", message)
    }
    /// INTERNAL_ERROR (500). The cause is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "tracking internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "internal error")
    }
}

impl ApiError {
    /// MLflow's `error_class` for the code.
    pub fn error_class(&self) -> &'static str {
        match self.code {
            "RESOURCE_DOES_NOT_EXIST" => "RESOURCE_NOT_FOUND",
            "BAD_REQUEST" => "INVALID_PARAMETER_VALUE",
            "INTERNAL_ERROR" | "INVALID_STATE" => "CLIENT_INTERNAL_ERROR",
            code => code,
        }
    }

    /// MLflow's `sqlstate` for the code.
    pub fn sqlstate(&self) -> &'static str {
        match self.code {
            "INTERNAL_ERROR" | "INVALID_STATE" => "XXM00",
            _ => "KAM00",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error_code": self.code,
            "message": self.message,
            "error_class": self.error_class(),
            "sqlstate": self.sqlstate(),
        });
        (self.status, Json(body)).into_response()
    }
}

/// Result of a tracking handler.
pub type ApiResult<T> = Result<T, ApiError>;

//! The one place where core errors and panics become Python exceptions. The
//! exception classes live in `operators.errors`, so Python users see one hierarchy
//! with docstrings and typed attributes.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::error::{EmbedError, ExtractError, Reason};

fn exception(py: Python<'_>, class: &str, args: &[String]) -> PyErr {
    let made = py
        .import("operators.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1(PyTuple::new(py, args)?));
    match made {
        Ok(instance) => PyErr::from_value(instance),
        Err(err) => err,
    }
}

pub fn extract_error(py: Python<'_>, e: ExtractError) -> PyErr {
    exception(
        py,
        "ExtractionError",
        &[e.reason.as_str().to_string(), e.message],
    )
}

pub fn embed_error(py: Python<'_>, e: EmbedError) -> PyErr {
    let class = match &e {
        EmbedError::ModelNotFound(_) => "ModelNotFoundError",
        EmbedError::InvalidModel(_) => "ModelError",
        EmbedError::Unsupported(_) => "UnsupportedError",
        EmbedError::Tokenizer(_) | EmbedError::Inference(_) | EmbedError::Io(_) => "EmbeddingError",
    };
    exception(py, class, &[e.to_string()])
}

/// Text of a panic payload.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs `work` without the GIL; a panic becomes an `ExtractionError(corrupt)`: a
/// parser that panics has met input it cannot read.
pub fn run_extraction<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> Result<T, ExtractError> + Send,
) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(work))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(extract_error(py, e)),
        Err(payload) => Err(extract_error(
            py,
            ExtractError::new(
                Reason::Corrupt,
                format!("parser failed: {}", panic_message(payload)),
            ),
        )),
    }
}

/// Runs `work` without the GIL; a panic becomes an `EmbeddingError`.
pub fn run_model<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> Result<T, EmbedError> + Send,
) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(work))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(embed_error(py, e)),
        Err(payload) => Err(exception(
            py,
            "EmbeddingError",
            &[format!("internal error: {}", panic_message(payload))],
        )),
    }
}

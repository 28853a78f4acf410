//! Bindings of the sparse encoders and rerankers: conversions only.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::errors::run_model;
use crate::embed::rerank::Reranker;
use crate::embed::sparse::{SparseEmbedder, SparseVector};
use crate::embed::LoadOptions;

/// `(indices, values)` of each vector.
type SparseTuple = (Vec<u32>, Vec<f32>);

fn tuples(vectors: Vec<SparseVector>) -> Vec<SparseTuple> {
    vectors.into_iter().map(|v| (v.indices, v.values)).collect()
}

fn options(
    device: String,
    dtype: String,
    max_batch_tokens: usize,
    hub_caches: Vec<PathBuf>,
) -> LoadOptions {
    LoadOptions {
        device,
        dtype,
        max_batch_tokens,
        hub_caches,
    }
}

#[pyclass(frozen, name = "SparseEmbedder", module = "operators._native")]
pub struct PySparseEmbedder {
    inner: SparseEmbedder,
}

#[pymethods]
impl PySparseEmbedder {
    #[new]
    #[pyo3(signature = (model, device, dtype, max_batch_tokens, hub_caches))]
    fn new(
        py: Python<'_>,
        model: String,
        device: String,
        dtype: String,
        max_batch_tokens: usize,
        hub_caches: Vec<PathBuf>,
    ) -> PyResult<Self> {
        let options = options(device, dtype, max_batch_tokens, hub_caches);
        let inner = run_model(py, || SparseEmbedder::load(&model, &options))?;
        Ok(Self { inner })
    }

    fn embed(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<SparseTuple>> {
        run_model(py, || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.inner.embed(&refs).map(tuples)
        })
    }

    fn embed_queries(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<SparseTuple>> {
        run_model(py, || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.inner.embed_queries(&refs).map(tuples)
        })
    }

    #[getter]
    fn family(&self) -> &'static str {
        self.inner.family.name()
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }
    #[getter]
    fn model_id(&self) -> &str {
        &self.inner.model_id
    }
    #[getter]
    fn model_revision(&self) -> &str {
        &self.inner.model_revision
    }
    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens
    }
    #[getter]
    fn max_batch_tokens(&self) -> usize {
        self.inner.max_batch_tokens
    }
    #[getter]
    fn device(&self) -> &str {
        &self.inner.device_name
    }
    #[getter]
    fn dtype(&self) -> &str {
        &self.inner.dtype
    }
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir.clone()
    }
}

#[pyclass(frozen, name = "Reranker", module = "operators._native")]
pub struct PyReranker {
    inner: Reranker,
}

#[pymethods]
impl PyReranker {
    #[new]
    #[pyo3(signature = (model, device, dtype, max_batch_tokens, hub_caches))]
    fn new(
        py: Python<'_>,
        model: String,
        device: String,
        dtype: String,
        max_batch_tokens: usize,
        hub_caches: Vec<PathBuf>,
    ) -> PyResult<Self> {
        let options = options(device, dtype, max_batch_tokens, hub_caches);
        let inner = run_model(py, || Reranker::load(&model, &options))?;
        Ok(Self { inner })
    }

    fn score(&self, py: Python<'_>, query: String, texts: Vec<String>) -> PyResult<Vec<f32>> {
        run_model(py, || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.inner.score(&query, &refs)
        })
    }

    #[getter]
    fn activation(&self) -> &'static str {
        self.inner.activation.name()
    }
    #[getter]
    fn model_id(&self) -> &str {
        &self.inner.model_id
    }
    #[getter]
    fn model_revision(&self) -> &str {
        &self.inner.model_revision
    }
    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens
    }
    #[getter]
    fn max_batch_tokens(&self) -> usize {
        self.inner.max_batch_tokens
    }
    #[getter]
    fn device(&self) -> &str {
        &self.inner.device_name
    }
    #[getter]
    fn dtype(&self) -> &str {
        &self.inner.dtype
    }
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir.clone()
    }
}

//! PyO3 bindings: conversions only. The typed API users see is in `operators/`.

mod errors;
mod retrieval;
mod speech;

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::chunk;
use crate::device::select_device;
use crate::embed::{self, ClipEmbedder, LoadOptions};
use crate::extract as core_extract;
use crate::extract::RgbImage;
use crate::limits::Limits;
use errors::{embed_error, run_extraction, run_model};

#[pyfunction]
#[pyo3(signature = (data, mime_type, filename, limits))]
fn extract<'py>(
    py: Python<'py>,
    data: &[u8],
    mime_type: Option<&str>,
    filename: Option<&str>,
    limits: Limits,
) -> PyResult<Bound<'py, PyDict>> {
    let mime_type = mime_type.map(str::to_owned);
    let filename = filename.map(str::to_owned);
    let doc = run_extraction(py, || {
        core_extract::extract(data, mime_type.as_deref(), filename.as_deref(), &limits)
    })?;
    let out = PyDict::new(py);
    out.set_item("text", doc.text)?;
    out.set_item("mime_type", doc.mime_type)?;
    out.set_item("pages", doc.pages)?;
    out.set_item("title", doc.title)?;
    out.set_item("metadata", doc.metadata)?;
    let image = doc
        .image
        .map(|i| (i.width, i.height, PyBytes::new(py, &i.data)));
    out.set_item("image", image)?;
    // Samples as little-endian f32 bytes: one copy, and the isolation pool's frame body.
    let audio = doc.audio.map(|a| {
        let bytes: Vec<u8> = a.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        (a.sample_rate, PyBytes::new(py, &bytes))
    });
    out.set_item("audio", audio)?;
    Ok(out)
}

/// Whisper's log-mel features of the first 30 s of 16 kHz mono `samples`:
/// `[n_mels, 3000]`, as transformers' `WhisperFeatureExtractor` computes them.
#[pyfunction]
#[pyo3(signature = (samples, n_mels=80))]
fn log_mel<'py>(
    py: Python<'py>,
    samples: numpy::PyReadonlyArray1<'py, f32>,
    n_mels: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    if !(1..=256).contains(&n_mels) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "n_mels must be between 1 and 256 (Whisper uses 80 or 128), not {n_mels}"
        )));
    }
    let samples = samples.as_slice()?.to_vec();
    let features = py.detach(|| crate::speech::mel::log_mel(&samples, n_mels));
    let array = Array2::from_shape_vec((n_mels, crate::speech::mel::N_FRAMES), features)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok(array.into_pyarray(py))
}

#[pyfunction]
#[pyo3(signature = (data, filename=None))]
fn sniff(data: &[u8], filename: Option<&str>) -> &'static str {
    crate::sniff::sniff(data, filename)
}

/// The canonical name of the device `name` selects (`"auto"` → `"cuda:0"` or
/// `"cpu"`); raises if it cannot be used in this build or on this machine.
#[pyfunction]
fn resolve_device(py: Python<'_>, name: String) -> PyResult<String> {
    run_model(py, || select_device(&name).map(|(_, canonical)| canonical))
}

/// Whether this build has the CUDA backend compiled in.
#[pyfunction]
fn cuda_built() -> bool {
    candle_core::utils::cuda_is_available()
}

#[pyclass(frozen, name = "Embedder", module = "operators._native")]
struct PyEmbedder {
    inner: embed::Embedder,
}

#[pymethods]
impl PyEmbedder {
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
        let options = LoadOptions {
            device,
            dtype,
            max_batch_tokens,
            hub_caches,
        };
        let inner = run_model(py, || embed::Embedder::load(&model, &options))?;
        Ok(Self { inner })
    }

    #[pyo3(signature = (texts, prompt=None))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        prompt: Option<String>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let dim = self.inner.dim;
        let rows = texts.len();
        let flat = run_model(py, || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.inner.embed(&refs, prompt.as_deref())
        })?;
        let array =
            Array2::from_shape_vec((rows, dim), flat).expect("embed returns rows * dim floats");
        Ok(array.into_pyarray(py))
    }

    fn count_tokens(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<usize>> {
        run_model(py, || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.inner.count_tokens(&refs)
        })
    }

    #[pyo3(signature = (max_tokens, overlap_tokens, strategy="greedy"))]
    fn chunker(
        &self,
        py: Python<'_>,
        max_tokens: usize,
        overlap_tokens: usize,
        strategy: &str,
    ) -> PyResult<PyChunker> {
        let tokenizer = self.inner.counting_tokenizer();
        PyChunker::new(py, tokenizer, max_tokens, overlap_tokens, strategy)
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
    fn dim(&self) -> usize {
        self.inner.dim
    }
    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.settings.max_tokens
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
    fn max_batch_tokens(&self) -> usize {
        self.inner.max_batch_tokens
    }
    #[getter]
    fn pooling(&self) -> &'static str {
        self.inner.settings.pooling.name()
    }
    #[getter]
    fn normalize(&self) -> bool {
        self.inner.settings.normalize
    }
    #[getter]
    fn prompts(&self) -> std::collections::BTreeMap<String, String> {
        self.inner.settings.prompts.clone()
    }
    #[getter]
    fn default_prompt_name(&self) -> Option<String> {
        self.inner.settings.default_prompt_name.clone()
    }
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir.clone()
    }
}

#[pyclass(frozen, name = "ImageEmbedder", module = "operators._native")]
struct PyImageEmbedder {
    inner: ClipEmbedder,
}

/// `(width, height, rgb bytes)`, as `operators.Image` carries it.
type ImageTuple = (u32, u32, Vec<u8>);

fn rgb_images(images: Vec<ImageTuple>) -> PyResult<Vec<RgbImage>> {
    images
        .into_iter()
        .map(|(width, height, data)| {
            if data.len() != (width as usize) * (height as usize) * 3 || width == 0 || height == 0 {
                Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "image of {width}x{height} needs {} RGB bytes, got {}",
                    width as usize * height as usize * 3,
                    data.len()
                )))
            } else {
                Ok(RgbImage {
                    width,
                    height,
                    data,
                })
            }
        })
        .collect()
}

#[pymethods]
impl PyImageEmbedder {
    #[new]
    fn new(py: Python<'_>, path: PathBuf, device: String, dtype: String) -> PyResult<Self> {
        let inner = run_model(py, || ClipEmbedder::load(&path, &device, &dtype))?;
        Ok(Self { inner })
    }

    fn embed_images<'py>(
        &self,
        py: Python<'py>,
        images: Vec<ImageTuple>,
        normalize: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let images = rgb_images(images)?;
        let rows = images.len();
        let flat = run_model(py, || {
            self.inner
                .embed_images(&images.iter().collect::<Vec<_>>(), normalize)
        })?;
        Ok(Array2::from_shape_vec((rows, self.inner.dim), flat)
            .expect("rows * dim")
            .into_pyarray(py))
    }

    fn embed_texts<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        normalize: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let rows = texts.len();
        let flat = run_model(py, || {
            self.inner.embed_texts(
                &texts.iter().map(String::as_str).collect::<Vec<_>>(),
                normalize,
            )
        })?;
        Ok(Array2::from_shape_vec((rows, self.inner.dim), flat)
            .expect("rows * dim")
            .into_pyarray(py))
    }

    fn token_ids(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        run_model(py, || {
            self.inner
                .token_ids(&texts.iter().map(String::as_str).collect::<Vec<_>>())
        })
    }

    /// The preprocessed pixels of one image, `[3, height, width]` flattened.
    fn pixel_values(&self, py: Python<'_>, image: ImageTuple) -> PyResult<Vec<f32>> {
        let image = rgb_images(vec![image])?.remove(0);
        Ok(py.detach(|| self.inner.preprocessor.pixel_values(&image)))
    }

    #[pyo3(signature = (max_tokens, overlap_tokens, strategy="greedy"))]
    fn chunker(
        &self,
        py: Python<'_>,
        max_tokens: usize,
        overlap_tokens: usize,
        strategy: &str,
    ) -> PyResult<PyChunker> {
        let tokenizer = self.inner.counting_tokenizer();
        PyChunker::new(py, tokenizer, max_tokens, overlap_tokens, strategy)
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
    fn dim(&self) -> usize {
        self.inner.dim
    }
    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens
    }
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir.clone()
    }
}

#[pyclass(frozen, name = "Chunker", module = "operators._native")]
struct PyChunker {
    inner: chunk::Chunker,
}

type ChunkTuple = (usize, usize, usize, Option<usize>, usize);

impl PyChunker {
    /// A chunker counting with `tokenizer`: what both embedders' `chunker` give.
    fn new(
        py: Python<'_>,
        tokenizer: tokenizers::Tokenizer,
        max_tokens: usize,
        overlap_tokens: usize,
        strategy: &str,
    ) -> PyResult<Self> {
        let strategy = chunk::Strategy::parse(strategy).map_err(|e| embed_error(py, e))?;
        let inner = run_model(py, || {
            chunk::Chunker::new(tokenizer, max_tokens, overlap_tokens, strategy)
        })?;
        Ok(Self { inner })
    }
}

#[pymethods]
impl PyChunker {
    /// Chunks as `(index, char_start, char_end, page, n_tokens)` tuples.
    #[pyo3(signature = (text, pages=None))]
    fn chunk(
        &self,
        py: Python<'_>,
        text: String,
        pages: Option<Vec<(usize, usize)>>,
    ) -> PyResult<Vec<ChunkTuple>> {
        let chunks = run_model(py, || self.inner.chunk(&text, pages.as_deref()))?;
        Ok(chunks
            .into_iter()
            .map(|c| (c.index, c.char_start, c.char_end, c.page, c.n_tokens))
            .collect())
    }
    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens
    }
    #[getter]
    fn overlap_tokens(&self) -> usize {
        self.inner.overlap_tokens
    }
    #[getter]
    fn strategy(&self) -> &'static str {
        self.inner.strategy.name()
    }
}

/// `(kernels in force, best kernels of this CPU)`: "portable", "avx2" or "avx512".
#[pyfunction]
fn cpu_kernels() -> (&'static str, &'static str) {
    (
        crate::nn::cpu::current().name(),
        crate::nn::cpu::Kernels::detected().name(),
    )
}

/// What the CPU path runs, after reading `EMBEDSTREAM_CPU_KERNELS` as a model load
/// does: our kernels, the GEMM's instruction set, the threads, and the CPU features
/// that decide them.
#[pyfunction]
fn cpu_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let kernels = crate::nn::cpu::configure().map_err(|e| embed_error(py, e))?;
    let info = PyDict::new(py);
    info.set_item("kernels", kernels.name())?;
    info.set_item("best_kernels", crate::nn::cpu::Kernels::detected().name())?;
    info.set_item("gemm", crate::nn::cpu::gemm().name())?;
    info.set_item("threads", rayon::current_num_threads())?;
    info.set_item("features", crate::nn::cpu::features())?;
    Ok(info)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(extract, m)?)?;
    m.add_function(wrap_pyfunction!(sniff, m)?)?;
    m.add_function(wrap_pyfunction!(log_mel, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_device, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_built, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_info, m)?)?;
    m.add_class::<PyEmbedder>()?;
    m.add_class::<PyChunker>()?;
    m.add_class::<PyImageEmbedder>()?;
    m.add_class::<speech::PyTranscriber>()?;
    m.add_class::<retrieval::PySparseEmbedder>()?;
    m.add_class::<retrieval::PyReranker>()?;
    m.add(
        "REASONS",
        crate::error::Reason::ALL.map(|r| r.as_str()).to_vec(),
    )?;
    m.add("SUPPORTED_TYPES", crate::sniff::SUPPORTED.to_vec())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

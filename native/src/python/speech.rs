//! Bindings of `speech::transcribe`: Whisper, with the steps tests compare one by one.

use std::path::PathBuf;

use candle_core::Tensor;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use super::errors::run_model;
use crate::device::{select_device, select_dtype};
use crate::error::EmbedError;
use crate::speech::transcribe::{Options, Task, Transcriber};

/// `(start_ms, end_ms, text)`.
type SegmentTuple = (u64, u64, String);

#[pyclass(frozen, name = "Transcriber", module = "operators._native")]
pub struct PyTranscriber {
    inner: Transcriber,
}

fn task(name: &str) -> Result<Task, EmbedError> {
    match name {
        "transcribe" => Ok(Task::Transcribe),
        "translate" => Ok(Task::Translate),
        other => Err(EmbedError::Unsupported(format!(
            "task {other:?}: expected \"transcribe\" or \"translate\""
        ))),
    }
}

impl PyTranscriber {
    fn features(&self, features: PyReadonlyArray2<'_, f32>) -> PyResult<Tensor> {
        let c = &self.inner.model.config;
        let view = features.as_array();
        let shape = view.shape();
        if shape != [c.num_mel_bins, c.window_frames()] {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "features of shape {shape:?}; this model takes [{}, {}]",
                c.num_mel_bins,
                c.window_frames()
            )));
        }
        let data = view.iter().copied().collect::<Vec<f32>>();
        Tensor::from_vec(data, (shape[0], shape[1]), &self.inner.model.device)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
    }

    /// `then` on the encoder's output for `features`, without the GIL.
    fn on_encoded<T: Send>(
        &self,
        py: Python<'_>,
        features: PyReadonlyArray2<'_, f32>,
        then: impl FnOnce(&Tensor) -> Result<T, EmbedError> + Send,
    ) -> PyResult<T> {
        let features = self.features(features)?;
        run_model(py, || then(&self.inner.encode(&features)?))
    }
}

#[pymethods]
impl PyTranscriber {
    #[new]
    fn new(py: Python<'_>, path: PathBuf, device: String, dtype: String) -> PyResult<Self> {
        let inner = run_model(py, || {
            let (device, _) = select_device(&device)?;
            let (dtype, linears) = select_dtype(&dtype, &device)?;
            Transcriber::load(&path, &device, dtype, linears)
        })?;
        Ok(Self { inner })
    }

    #[getter]
    fn n_mels(&self) -> usize {
        self.inner.model.config.num_mel_bins
    }

    #[getter]
    fn languages(&self) -> Vec<String> {
        self.inner
            .specials
            .languages
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// `[n_mels, 3000]` features → the encoder's `[1500, d_model]` output.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        features: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (rows, cols, flat) = self.on_encoded(py, features, |encoded| {
            let out = encoded.squeeze(0)?;
            let (rows, cols) = out.dims2()?;
            let flat = out
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            Ok((rows, cols, flat))
        })?;
        Ok(Array2::from_shape_vec((rows, cols), flat)
            .expect("rows * cols")
            .into_pyarray(py))
    }

    fn detect_language(
        &self,
        py: Python<'_>,
        features: PyReadonlyArray2<'_, f32>,
    ) -> PyResult<Option<String>> {
        self.on_encoded(py, features, |encoded| self.inner.detect_language(encoded))
    }

    #[pyo3(signature = (language=None, task_name="transcribe", timestamps=true))]
    fn prompt(
        &self,
        py: Python<'_>,
        language: Option<String>,
        task_name: &str,
        timestamps: bool,
    ) -> PyResult<Vec<u32>> {
        run_model(py, || {
            self.inner
                .prompt(language.as_deref(), task(task_name)?, timestamps)
        })
    }

    /// The prompt and `steps` tokens of plain argmax (no rules).
    fn greedy(
        &self,
        py: Python<'_>,
        features: PyReadonlyArray2<'_, f32>,
        prompt: Vec<u32>,
        steps: usize,
    ) -> PyResult<Vec<u32>> {
        self.on_encoded(py, features, |encoded| {
            self.inner.greedy(encoded, &prompt, steps)
        })
    }

    /// One window under the timestamp rules: the tokens after the prompt.
    fn decode_window(
        &self,
        py: Python<'_>,
        features: PyReadonlyArray2<'_, f32>,
        prompt: Vec<u32>,
        max_new_tokens: usize,
    ) -> PyResult<Vec<u32>> {
        self.on_encoded(py, features, |encoded| {
            self.inner.decode_window(encoded, &prompt, max_new_tokens)
        })
    }

    /// One window's tokens → its segments and the frames it consumed (the seek).
    fn segments(
        &self,
        tokens: Vec<u32>,
        offset_ms: u64,
        frames: usize,
    ) -> (Vec<SegmentTuple>, usize) {
        let (segments, advance) = self.inner.split_segments(&tokens, offset_ms, frames);
        let segments = segments
            .into_iter()
            .map(|s| (s.start_ms, s.end_ms, s.text))
            .collect();
        (segments, advance)
    }

    /// 16 kHz mono samples → (language, [(start_ms, end_ms, text)]).
    #[pyo3(signature = (samples, language=None, task_name="transcribe", max_new_tokens=None))]
    fn transcribe(
        &self,
        py: Python<'_>,
        samples: PyReadonlyArray1<'_, f32>,
        language: Option<String>,
        task_name: &str,
        max_new_tokens: Option<usize>,
    ) -> PyResult<(Option<String>, Vec<SegmentTuple>)> {
        let samples = samples.as_slice()?.to_vec();
        run_model(py, || {
            let options = Options {
                language,
                task: task(task_name)?,
                max_new_tokens,
            };
            let transcript = self.inner.transcribe(&samples, &options)?;
            let segments = transcript
                .segments
                .into_iter()
                .map(|s| (s.start_ms, s.end_ms, s.text))
                .collect();
            Ok((transcript.language, segments))
        })
    }
}

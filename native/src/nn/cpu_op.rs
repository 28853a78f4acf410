//! Our CPU kernels as candle custom ops: one adapter hands each op its input, and
//! the second one where there is (a residual, an attention bias), as contiguous f32.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The second input of a two-input op, with its layout.
pub type Second<'a> = Option<(&'a [f32], &'a Layout)>;
/// What an op gives candle: its output's storage and shape.
pub type Output = Result<(CpuStorage, Shape)>;

/// An op of ours on f32 CPU tensors.
pub trait F32Op: Send + Sync {
    /// candle's name of the op, and of its form with a second input.
    const NAME: &'static str;
    const NAME_WITH_SECOND: &'static str = Self::NAME;
    /// What errors call the op, its input and its second input.
    const LABEL: &'static str;
    const INPUT: &'static str = "input";
    const SECOND: &'static str = "second input";

    /// The output for `x`, laid out as `layout`, and the second input if the op has one.
    fn run(&self, x: &[f32], layout: &Layout, second: Second) -> Output;
}

/// Runs `op` on `x`, and on `second` when given, both made contiguous first.
pub fn apply<T: F32Op>(op: &T, x: &Tensor, second: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    match second {
        Some(second) => x.apply_op2_no_bwd(&second.contiguous()?, &Adapter(op)),
        None => x.apply_op1_no_bwd(&Adapter(op)),
    }
}

/// The f32 elements a contiguous CPU tensor covers; `op` and `what` name it in errors.
pub fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

struct Adapter<'a, T>(&'a T);

impl<T: F32Op> CustomOp1 for Adapter<'_, T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, T::LABEL, T::INPUT)?;
        self.0.run(x, layout, None)
    }
}

impl<T: F32Op> CustomOp2 for Adapter<'_, T> {
    fn name(&self) -> &'static str {
        T::NAME_WITH_SECOND
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, T::LABEL, T::INPUT)?;
        let second = contiguous_f32(s2, l2, T::LABEL, T::SECOND)?;
        self.0.run(x, l1, Some((second, l2)))
    }
}
